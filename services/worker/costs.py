"""What loading a prefix block costs against computing it again, measured on this worker.

    engine thread ── record_step(seconds, tokens) ──▶ prefill seconds per token ─┐
    event loop    ── record_load(seconds, blocks)  ──▶ seconds per block, by tier ─┤
                                                                                  ▼
             blocks_worth_loading(tiers, …): load a leading run only while it saves time
             heartbeat (WorkerLoad): prefill_tokens_per_s, load_s_per_block → MoR's tier prices

- prefill: an exponential moving average (weight `WEIGHT`) of step seconds / tokens computed,
  over the steps that computed at least `MIN_PREFILL_TOKENS` tokens (prefill chunks). It
  includes the step's fixed share (weights read once per step), so it is an upper bound of a
  prompt token's marginal cost, close to it at a full chunk.
- load[tier]: the same average of a GetBlocks call's seconds (the transfer and the decode into
  tensors) / blocks, for the tier that served them; a call that mixed tiers counts for each.

Plain floats written by one thread and read by others: a reader sees the last value or the
one before, never a torn one (CPython).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from wicore.kv.block import StorageTier

MIN_PREFILL_TOKENS = 64
WEIGHT = 0.2


@dataclass(slots=True)
class Ewma:
    value: float = 0.0  # 0: nothing measured yet
    weight: float = WEIGHT

    def add(self, sample: float) -> None:
        self.value = sample if self.value == 0.0 else (1.0 - self.weight) * self.value + self.weight * sample


class CostMeter:
    def __init__(self) -> None:
        self.prefill_s_per_token = Ewma()
        self.load_s_per_block = {tier: Ewma() for tier in StorageTier if tier is not StorageTier.DEVICE}

    def record_step(self, seconds: float, tokens: int) -> None:
        """One engine step's forward pass and sampling over `tokens` rows."""
        if tokens >= MIN_PREFILL_TOKENS and seconds > 0.0:
            self.prefill_s_per_token.add(seconds / tokens)

    def record_load(self, seconds: float, blocks: Mapping[StorageTier, int]) -> None:
        """One GetBlocks call that brought `blocks[tier]` blocks from each tier, decoded."""
        total = sum(blocks.values())
        if total <= 0 or seconds <= 0.0:
            return
        for tier, n in blocks.items():
            if n > 0 and tier in self.load_s_per_block:
                self.load_s_per_block[tier].add(seconds / total)

    @property
    def prefill_tokens_per_s(self) -> float:
        """0.0 until a prefill step was measured."""
        s = self.prefill_s_per_token.value
        return 1.0 / s if s > 0.0 else 0.0

    def load_seconds(self) -> dict[StorageTier, float]:
        """Seconds per block by tier, for the tiers measured so far."""
        return {tier: e.value for tier, e in self.load_s_per_block.items() if e.value > 0.0}


def blocks_worth_loading(
    tiers: Sequence[StorageTier], load_s: Mapping[StorageTier, float], recompute_s: float
) -> int:
    """How many of the leading blocks (block j in tier `tiers[j]`) to load: the k that maximises
    the time saved, Σ_{j<k} (recompute_s - load_s[tiers[j]]), the smallest such k on ties (k = 0:
    recompute them all). A tier not measured yet costs nothing (load: it is how it gets measured);
    `recompute_s` 0 (prefill not measured yet) loads every block."""
    if recompute_s <= 0.0:
        return len(tiers)
    best, saved, best_saved = 0, 0.0, 0.0
    for j, tier in enumerate(tiers):
        saved += recompute_s - load_s.get(tier, 0.0)
        if saved > best_saved:
            best, best_saved = j + 1, saved
    return best
