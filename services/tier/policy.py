"""Eviction policies of the memory tiers: A²CR (docs/architecture.md) and LRU / LFU baselines.

Pure Python over `BlockStats`, with the clock injected: no Redis, no sockets, no
tensors. A policy only *scores* blocks (higher = worth keeping); the selection
helpers below turn scores into victims, the same way for every policy, so that
policies can be swapped and compared on one trace.

    score ▲  F = c / (1 + c),  c = hits · exp(-idle / 300 s)       keep
          │  ● system prompt: read by every request
          │      ● chat history, read again each turn
          │         ● block just written, read once (c = 1: 0.5)
    thr ──┼──────────────────────────────  A²CR only: below this, demoted at cleanup
          │  ● one-off prompt, minutes old; a session that ended
          ▼                                    victims under pressure go first: lowest score,
                                               then older last_access, then the deeper position
                                               in its chain (leaf before root), then hash

What A²CR's default score is, and why (benchmark/policy_replay.py, README "A²CR eviction"):
- The engine reuses the leading run of a chain: a block is worth keeping only while its whole
  prefix is, and every read of a block is also a read of its prefix. So a prefix is reused at
  least as often as anything behind it, and the number of reads through a block, aged, is the
  estimate of its reuse: F, a decayed frequency (LRFU's). Blocks read together (one chain) tie
  on it and lose their leaves first (`_victim_order`).
- The measured attention share A does not predict reuse: it ranks a chain's newest turn above
  the history it depends on, and a document's middle below its edges though they are reused
  together; what it does see (the sink, the system prompt) F sees too. Every weighting of A
  tried (0.1 to 0.4 added, or a factor) lowered the hit rates measured, so its default weight
  is 0 (a2cr_config.attention_weight keeps it available; the worker still measures it for the
  device pool's second chance).
- Short-horizon recency R (the guide's λ 0.02-0.1/s: under a minute) is LRU inside the score:
  users who come back after more blocks than a tier holds find them gone. Default weight 0.
- Admission (`promotion_bar`, TinyLFU's): an NVMe hit enters a full CPU tier only if it was
  read more often than the CPU's median resident (the lower median of their read counts), so a
  loop over more blocks than CPU RAM holds keeps a stable share there instead of cycling it all
  through, and a block read once or twice is served from NVMe instead of displacing one that
  earns its place. The median follows what the tier holds: a tier of mostly fresh, once-read
  blocks admits anything read twice; one holding a hot set asks as much as its typical member
  (and one where nothing was read twice admits everything).

Under capacity pressure a tier frees bytes down to a low watermark
(`bytes_to_free`), taking `select_victims` in order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass
from typing import Protocol

from wicore.config import A2crConfig, TierPolicy
from wicore.errors import ConfigError
from wicore.kv.attention import UNIFORM_ATTENTION, attention_alpha, fold_attention
from wicore.kv.hashing import BlockHash

Clock = Callable[[], float]

# F = c / (c + k), c the decayed hit count: with k = 1 a block just read once scores 0.5 (the
# middle, as A's uniform prior), read four times 0.8; frequency saturates instead of growing
# without bound, and the threshold 0.2 (0.4 under pressure) demotes a block whose decayed count
# fell below 1/4 (2/3) of a read: read once and idle for τ·ln 4 ≈ 7 min (τ·ln 1.5 ≈ 2 min).
FREQUENCY_K = 1.0


@dataclass(slots=True)
class BlockStats:
    """What a policy knows about one stored block. Times are the injected clock's seconds.

    `attention` stays in [0, 1]; `hits` counts accesses (`touch`), the first included;
    `observations` counts the attention samples folded into `attention`; `position` is the
    block's index in the chain of its latest access (0: the chain's first block, or unknown):
    among blocks last read at the same moment, the deeper one is the victim first.
    """

    block_hash: BlockHash
    size_bytes: int
    created: float
    last_access: float
    hits: int = 0
    attention: float = UNIFORM_ATTENTION
    observations: int = 0
    position: int = 0

    def __post_init__(self) -> None:
        if self.size_bytes < 0:
            raise ValueError(f"size_bytes: must be >= 0, got {self.size_bytes}")
        if self.hits < 0:
            raise ValueError(f"hits: must be >= 0, got {self.hits}")
        if self.observations < 0:
            raise ValueError(f"observations: must be >= 0, got {self.observations}")
        if not 0.0 <= self.attention <= 1.0:
            raise ValueError(f"attention: must be in [0, 1], got {self.attention}")
        if self.position < 0:
            raise ValueError(f"position: must be >= 0, got {self.position}")


def observe_attention(
    stats: BlockStats, mass: float, blocks_in_sequence: int, alpha: float | None = None
) -> float:
    """Folds one observation into A: A ← (1 - alpha)*A + alpha*A_obs. Returns the new A.

    `alpha` None (the default) weighs the sample by `attention_alpha` of the block's
    observation count; a number gives a fixed-weight EMA.
    """
    if alpha is not None and not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha: must be in (0, 1], got {alpha}")
    stats.observations += 1
    weight = attention_alpha(stats.observations) if alpha is None else alpha
    stats.attention = fold_attention(stats.attention, weight, mass, blocks_in_sequence)
    return stats.attention


@dataclass(frozen=True, slots=True)
class TunedParams:
    eviction_threshold: float
    time_decay_factor: float


DEFAULT_A2CR = A2crConfig()


def adaptive_params(pressure: float, config: A2crConfig = DEFAULT_A2CR) -> TunedParams:
    """The threshold and decay at `pressure` (used / capacity of the tier; above 1 while a tier
    is over capacity): the performance guide's table, scaled around the configured values.

        threshold = clamp(T(p) · eviction_threshold / 0.2, 0, 1)
        decay     = D(p) · time_decay_factor / 0.05

        T(p), D(p) = 0.4, 0.1 if p > 0.9;  0.3, 0.05 if p > 0.7;  0.2, 0.02 otherwise
        (the boundaries 0.7 and 0.9 belong to the lower row)

    0.2 and 0.05 are the defaults, so the default config gets the table itself; an operator's
    0.1 / 0.01 moves between 0.1 / 0.004 and 0.2 / 0.02. `a2cr_config.adaptive: false` keeps the
    configured values (see `A2CRPolicy.tune`).
    """
    if not pressure >= 0.0 or math.isinf(pressure):  # `not >=` also rejects NaN
        raise ValueError(f"pressure: must be a finite number >= 0, got {pressure}")
    if pressure > 0.9:
        threshold, decay = 0.4, 0.1
    elif pressure > 0.7:
        threshold, decay = 0.3, 0.05
    else:
        threshold, decay = 0.2, 0.02
    # Scale factors first: exactly 1.0 for the defaults, so the table's values come out unrounded.
    threshold_scale = config.eviction_threshold / DEFAULT_A2CR.eviction_threshold
    decay_scale = config.time_decay_factor / DEFAULT_A2CR.time_decay_factor
    return TunedParams(
        eviction_threshold=min(1.0, max(0.0, threshold * threshold_scale)),
        time_decay_factor=decay * decay_scale,
    )


class EvictionPolicy(Protocol):
    """Scores blocks (higher = keep). `threshold` is None for a policy with no absolute scale."""

    name: str

    @property
    def threshold(self) -> float | None: ...

    @property
    def params(self) -> TunedParams | None:
        """The current (tuned) threshold and decay; None for a policy without them."""
        ...

    def score(self, stats: BlockStats) -> float: ...

    def touch(self, stats: BlockStats, at: float | None = None) -> None:
        """Counts an access at `at` (None: the clock now); the blocks of one chain read together
        are touched with one `at`, so that `position` orders them."""
        ...

    def tune(self, pressure: float) -> TunedParams | None: ...

    def promotion_bar(self, residents: Iterable[BlockStats]) -> int | None:
        """None: a block read from a slower tier is always copied into the full faster tier;
        a number: only a block with more `hits` than that, before this read (`admits`)."""
        ...


def admits(bar: int | None, hits_before: int) -> bool:
    """Whether a block read `hits_before` times before this read is promoted past `bar`."""
    return bar is None or hits_before > bar


def _touch(stats: BlockStats, now: float) -> None:
    stats.hits += 1
    stats.last_access = now


class A2CRPolicy:
    """A²CR (attention, frequency, recency); owns the current (tuned) threshold and decay (the
    decay is R's: with the default weights only the threshold matters).

    Starts with `config.eviction_threshold` / `config.time_decay_factor`; after `tune(p)`
    it uses `adaptive_params(p, config)` (the configured values scaled by the guide's
    table) until the next `tune`; with `config.adaptive` false it keeps the configured
    values. Tune at the periodic cleanup with the tier's pressure then, not at the moment
    a write crosses the high watermark: that sample is >= 0.9 by construction and would
    pin the decay at twice the configured one (0.1/s by default, a 10 s recency horizon,
    shorter than a chat user's pause).
    """

    name = "a2cr"

    def __init__(self, config: A2crConfig, clock: Clock, *, frequency_k: float = FREQUENCY_K) -> None:
        for field in ("attention_weight", "frequency_weight", "recency_weight", "time_decay_factor"):
            value = getattr(config, field)
            if not (math.isfinite(value) and value >= 0.0):
                raise ConfigError(f"a2cr_config.{field}: must be a finite number >= 0, got {value}")
        if not (math.isfinite(config.frequency_horizon) and config.frequency_horizon > 0.0):
            raise ConfigError(
                f"a2cr_config.frequency_horizon: must be a finite number of seconds > 0, "
                f"got {config.frequency_horizon}"
            )
        if not frequency_k > 0.0:
            raise ValueError(f"frequency_k: must be > 0, got {frequency_k}")
        self._config = config
        self._clock = clock
        self._k = frequency_k
        self.params = TunedParams(config.eviction_threshold, config.time_decay_factor)

    @property
    def threshold(self) -> float:
        return self.params.eviction_threshold

    def score(self, stats: BlockStats) -> float:
        """score(b, t) = w_a·A(b) + w_f·F(b, t) + w_r·R(b, t), each term in [0, 1]:

        F(b, t) = c / (c + k),  c = hits · exp(-age / τ)   the decayed frequency: every read
                  counts, and counts less the longer the block has been idle;
                  τ = frequency_horizon (300 s), k = frequency_k (1)
        A(b)    = stats.attention: mean of the samples r / (1 + r), r = mass * blocks_in_sequence,
                  with the prior 0.5 counted as 2 samples, an EMA (weight 0.1) after 8
                  (`observe_attention`)
        R(b, t) = exp(-λ · age), λ = the tuned time_decay_factor
        age     = max(0, t - last_access), t = clock(): a last_access in the future counts as "now".
        w_a, w_f, w_r = a2cr_config.{attention,frequency,recency}_weight: 0, 1, 0 by default, so
        the default score is F alone (see the module docstring for why).
        """
        c = self._config
        age = max(0.0, self._clock() - stats.last_access)
        decayed = stats.hits * math.exp(-age / c.frequency_horizon)
        frequency = decayed / (decayed + self._k)
        score = c.frequency_weight * frequency
        if c.attention_weight:
            score += c.attention_weight * stats.attention
        if c.recency_weight:
            score += c.recency_weight * math.exp(-self.params.time_decay_factor * age)
        return score

    def touch(self, stats: BlockStats, at: float | None = None) -> None:
        _touch(stats, self._clock() if at is None else at)

    def tune(self, pressure: float) -> TunedParams:
        tuned = adaptive_params(pressure, self._config)  # checks `pressure` either way
        if self._config.adaptive:
            self.params = tuned
        return self.params

    def promotion_bar(self, residents: Iterable[BlockStats]) -> int | None:
        """TinyLFU's admission: the lower median of the residents' `hits` (None while none of
        them was read twice: nothing there has proven a reuse to defend). A block read from NVMe
        is copied into a full CPU tier only if it was read more often than that, i.e. if it would
        rank in the upper half of the tier by reads: a loop over more blocks than the tier holds
        then keeps a stable share in it instead of replacing it all, returning user after
        returning user, and a block read once or twice is served from NVMe rather than
        displacing a resident (a promotion is a read now and, once evicted again, maybe a
        write). `a2cr_config.promotion_admission: false`: None (every read block is promoted).

        The median rather than the least-read resident with proven reuse (WiCore's earlier
        bar): a single twice-read resident no longer opens the tier to every block read three
        times. Measured on both traces of benchmark/policy_replay.py (README "Eviction policy"):
        up to 5 points more of LRU's bytes saved, the replay at or above LRU in every class."""
        if not self._config.promotion_admission:
            return None
        hits = sorted(b.hits for b in residents)
        if not hits or hits[-1] < 2:
            return None
        return hits[(len(hits) - 1) // 2]


class LRUPolicy:
    """Least recently used: score = last_access (seconds of the clock), no threshold."""

    name = "lru"
    threshold = None
    params = None

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    def score(self, stats: BlockStats) -> float:
        return stats.last_access

    def touch(self, stats: BlockStats, at: float | None = None) -> None:
        _touch(stats, self._clock() if at is None else at)

    def tune(self, pressure: float) -> None:
        return None

    def promotion_bar(self, residents: Iterable[BlockStats]) -> None:
        return None


class LFUPolicy:
    """Least frequently used: score = hits (no aging), ties to the older access; no threshold."""

    name = "lfu"
    threshold = None
    params = None

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    def score(self, stats: BlockStats) -> float:
        return float(stats.hits)

    def touch(self, stats: BlockStats, at: float | None = None) -> None:
        _touch(stats, self._clock() if at is None else at)

    def tune(self, pressure: float) -> None:
        return None

    def promotion_bar(self, residents: Iterable[BlockStats]) -> None:
        return None


POLICIES: dict[TierPolicy, Callable[[A2crConfig, Clock], EvictionPolicy]] = {
    TierPolicy.A2CR: A2CRPolicy,
    TierPolicy.LRU: lambda _config, clock: LRUPolicy(clock),
    TierPolicy.LFU: lambda _config, clock: LFUPolicy(clock),
}


def make_policy(name: TierPolicy, config: A2crConfig, clock: Clock) -> EvictionPolicy:
    """The policy `name` names (`tier.policy`, checked when the config was loaded)."""
    return POLICIES[TierPolicy(name)](config, clock)


def _victim_order(policy: EvictionPolicy, blocks: Iterable[BlockStats]) -> list[BlockStats]:
    """Lowest score first; ties: older last_access first, then the deeper `position` (a chain
    loses its leaves before its root: a block is reusable only behind its whole prefix),
    then block hash. The same for every policy."""
    return sorted(blocks, key=lambda b: (policy.score(b), b.last_access, -b.position, b.block_hash))


def below_threshold(policy: EvictionPolicy, blocks: Iterable[BlockStats]) -> list[BlockStats]:
    """Blocks to demote at a periodic cleanup, in victim order: score < policy.threshold.

    LRU and LFU scores are timestamps and counts with no absolute scale, so those
    policies have no threshold and demote nothing at cleanup; they only evict
    under capacity pressure.
    """
    threshold = policy.threshold
    if threshold is None:
        return []
    return [b for b in _victim_order(policy, blocks) if policy.score(b) < threshold]


def select_victims(
    policy: EvictionPolicy, blocks: Iterable[BlockStats], bytes_to_free: int
) -> list[BlockStats]:
    """The shortest prefix of the victim order whose sizes add up to `bytes_to_free`.

    Every block if they are not enough; none if `bytes_to_free` <= 0.
    """
    victims: list[BlockStats] = []
    freed = 0
    if bytes_to_free <= 0:
        return victims
    for block in _victim_order(policy, blocks):
        victims.append(block)
        freed += block.size_bytes
        if freed >= bytes_to_free:
            break
    return victims


def select_victims_redundant_first(
    policy: EvictionPolicy, blocks: Iterable[BlockStats], bytes_to_free: int, redundant: Container[BlockHash]
) -> list[BlockStats]:
    """`select_victims`, first among the blocks in `redundant` (another tier holds a copy, so
    dropping this one loses nothing now), then among the rest."""
    candidates = list(blocks)
    victims: list[BlockStats] = []
    for first in (True, False):
        group = [b for b in candidates if (b.block_hash in redundant) is first]
        chosen = select_victims(policy, group, bytes_to_free)
        victims += chosen
        bytes_to_free -= sum(b.size_bytes for b in chosen)
        if bytes_to_free <= 0:
            break
    return victims


def room_to_make(used: int, incoming: int, capacity: int, low: float) -> int:
    """Bytes to free before `incoming` bytes go in: 0 while they fit; otherwise enough to
    bring the tier down to its low watermark with them, used + incoming - floor(low * capacity)."""
    if used + incoming <= capacity:
        return 0
    return used + incoming - math.floor(low * capacity)


def bytes_to_free(used: int, capacity: int, high: float = 0.9, low: float = 0.8) -> int:
    """0 while used < high * capacity; otherwise the bytes that bring used down to low * capacity."""
    if capacity <= 0:
        raise ValueError(f"capacity: must be > 0, got {capacity}")
    if used < 0:
        raise ValueError(f"used: must be >= 0, got {used}")
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"watermarks: need 0 <= low <= high <= 1, got low={low} high={high}")
    if used < high * capacity:
        return 0
    return max(0, used - math.floor(low * capacity))
