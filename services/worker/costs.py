"""What loading a prefix block costs against computing it again, measured on this worker.

    engine thread ── record_step(seconds, …)       ──▶ prefill seconds per token ─┐
    event loop    ── record_load(seconds, blocks)  ──▶ seconds per block, by tier ─┤
                                                                                  ▼
             blocks_worth_loading(tiers, …): load a leading run only while it saves time
             heartbeat (WorkerLoad): prefill_tokens_per_s, load_s_per_block → MoR's tier prices

- prefill: an exponential moving average (weight `WEIGHT`) of step seconds / rows computed,
  over the steps that computed at least `MIN_PREFILL_TOKENS` prompt tokens (prefill chunks;
  decode rows and speculative proposals are not prompt tokens), after the first
  `WARMUP_STEPS` such steps (kernel selection, caches warming). It includes the step's fixed
  share (weights read once per step), so it is an upper bound of a prompt token's marginal
  cost, close to it at a full chunk.
- load[tier]: the same average of a GetBlocks call's seconds (the transfer and the decode into
  tensors) / blocks, over the calls that one tier served entirely.
- A tier measured too slow to load from is tried again every `EXPLORE_EVERY`-th run it would
  decline (offload.py), so one slow sample cannot turn it off for good.

Plain floats written by one thread and read by others: a reader sees the last value or the
one before, never a torn one (CPython).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from wicore.kv.block import StorageTier

MIN_PREFILL_TOKENS = 64
WARMUP_STEPS = 2
WEIGHT = 0.2
EXPLORE_EVERY = 16


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
        self._prefill_steps = 0

    def record_step(self, seconds: float, prompt_tokens: int, rows: int) -> None:
        """One engine step's forward pass and sampling: `rows` computed, `prompt_tokens` of them
        prompt tokens (the rest decode rows and proposals)."""
        if prompt_tokens < MIN_PREFILL_TOKENS or seconds <= 0.0 or rows <= 0:
            return
        self._prefill_steps += 1
        if self._prefill_steps > WARMUP_STEPS:
            self.prefill_s_per_token.add(seconds / rows)

    def record_load(self, seconds: float, blocks: Mapping[StorageTier, int]) -> None:
        """One GetBlocks call that brought `blocks[tier]` blocks from each tier, decoded; only a
        call that one tier served is a measurement of that tier."""
        served = {tier: n for tier, n in blocks.items() if n > 0}
        if len(served) != 1 or seconds <= 0.0:
            return
        ((tier, n),) = served.items()
        if tier in self.load_s_per_block:
            self.load_s_per_block[tier].add(seconds / n)

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
