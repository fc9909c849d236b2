"""A²CR and the LRU / LFU baselines: exact scores, eviction order, tuning table, watermarks."""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
from pathlib import Path

import pytest

from wicore.config import A2crConfig, TierPolicy, load_config
from wicore.errors import ConfigError
from wicore.kv.attention import attention_alpha, attention_from_mass
from wicore.kv.hashing import BlockHash
from wicore.tier.policy import (
    A2CRPolicy,
    BlockStats,
    EvictionPolicy,
    LFUPolicy,
    LRUPolicy,
    TunedParams,
    adaptive_params,
    admits,
    below_threshold,
    bytes_to_free,
    make_policy,
    observe_attention,
    room_to_make,
    select_victims,
    select_victims_redundant_first,
)

from clocks import ManualClock


def block(name: str, last_access: float, hits: int = 1, attention: float = 0.5, size: int = 10) -> BlockStats:
    return BlockStats(
        BlockHash(name), size, created=0.0, last_access=last_access, hits=hits, attention=attention
    )


def names(blocks: list[BlockStats]) -> list[str]:
    return [b.block_hash for b in blocks]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def a2cr(clock: ManualClock) -> A2CRPolicy:
    return A2CRPolicy(A2crConfig(), clock)


# The performance guide's weights: attention and short-horizon recency take part.
GUIDE_WEIGHTS = A2crConfig(attention_weight=0.4, frequency_weight=0.3, recency_weight=0.3)


@pytest.fixture
def guide(clock: ManualClock) -> A2CRPolicy:
    return A2CRPolicy(GUIDE_WEIGHTS, clock)


def decayed_f(hits: int, idle: float) -> float:
    """F = c / (1 + c), c = hits · exp(-idle / 300): the default score."""
    c = hits * math.exp(-idle / 300.0)
    return c / (1.0 + c)


# --- attention -------------------------------------------------------------------


def test_unobserved_block_counts_as_uniform_attention() -> None:
    assert BlockStats(BlockHash("x"), 1, created=0.0, last_access=0.0).attention == 0.5


@pytest.mark.parametrize(
    ("mass", "blocks", "expected"),
    [(0.25, 4, 0.5), (0.0, 4, 0.0), (0.75, 4, 0.75), (1.0, 1, 0.5), (0.1, 90, 0.9)],
)
def test_attention_from_mass(mass: float, blocks: int, expected: float) -> None:
    assert attention_from_mass(mass, blocks) == pytest.approx(expected)


def test_observe_attention_is_a_mean_shrunk_to_the_prior() -> None:
    stats = block("x", 0.0)
    assert observe_attention(stats, 0.75, 4) == pytest.approx(0.5 + 0.25 / 3)  # A_obs 0.75, weight 1/3
    assert observe_attention(stats, 0.25, 4) == pytest.approx((1.0 + 0.75 + 0.5) / 4)  # A_obs 0.5
    assert observe_attention(stats, 0.0, 4) == pytest.approx((1.0 + 0.75 + 0.5 + 0.0) / 5)
    assert stats.observations == 3


def test_observe_attention_with_fixed_alpha_is_an_ema() -> None:
    stats = block("x", 0.0)
    assert observe_attention(stats, 0.75, 4, alpha=0.5) == pytest.approx(0.625)  # 0.5·0.5 + 0.5·0.75
    assert observe_attention(stats, 0.0, 4, alpha=0.2) == pytest.approx(0.5)  # 0.8·0.625 + 0.2·0
    assert (stats.attention, stats.observations) == (pytest.approx(0.5), 2)


def test_attention_alpha_falls_to_its_floor() -> None:
    assert [attention_alpha(n) for n in (1, 2, 8, 9, 1000)] == pytest.approx([1 / 3, 1 / 4, 0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="observations"):
        attention_alpha(0)


def test_one_sample_does_not_outrank_steady_evidence(guide: A2CRPolicy) -> None:
    """A one-off block read once with a large share vs a chat block read four times at a modest share."""
    one_off, chat = block("one-off", 100.0, hits=4), block("chat", 100.0, hits=4)
    observe_attention(one_off, 0.3, 10)  # A_obs 0.75
    for _ in range(4):
        observe_attention(chat, 0.1, 10)  # A_obs 0.5
    observe_attention(chat, 0.3, 10)
    # one-off 0.5 + 0.25/3 = 0.583; chat (1 + 4·0.5 + 0.75) / 7 = 0.536: closer than one sample says
    assert (one_off.attention, chat.attention) == (pytest.approx(0.5 + 0.25 / 3), pytest.approx(3.75 / 7))
    assert guide.score(one_off) - guide.score(chat) == pytest.approx(0.4 * (0.5 + 0.25 / 3 - 3.75 / 7))


@pytest.mark.parametrize(
    ("mass", "blocks", "alpha"), [(-0.1, 4, 0.5), (1.5, 4, 0.5), (0.5, 0, 0.5), (0.5, 4, 0.0)]
)
def test_observe_attention_rejects_bad_input(mass: float, blocks: int, alpha: float) -> None:
    with pytest.raises(ValueError):
        observe_attention(block("x", 0.0), mass, blocks, alpha=alpha)


@pytest.mark.parametrize("kwargs", [{"size": -1}, {"hits": -1}, {"attention": 1.5}])
def test_block_stats_validates(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        block("x", 0.0, **kwargs)
    with pytest.raises(ValueError, match="observations"):
        BlockStats(BlockHash("x"), 1, created=0.0, last_access=0.0, observations=-1)


# --- A²CR score --------------------------------------------------------------------


def test_a2cr_score_exact(a2cr: A2CRPolicy, guide: A2CRPolicy) -> None:
    stats = block("x", last_access=90.0, hits=4, attention=0.75)  # now 100: idle 10 s
    c = 4 * math.exp(-10 / 300)
    assert a2cr.score(stats) == pytest.approx(c / (1 + c), abs=1e-12)  # the default: F alone
    # the guide's weights: 0.4·0.75 + 0.3·F + 0.3·exp(-0.05·10)
    assert guide.score(stats) == pytest.approx(0.3 + 0.3 * c / (1 + c) + 0.3 * math.exp(-0.5), abs=1e-12)


def test_a2cr_score_of_future_access_counts_as_now(a2cr: A2CRPolicy, guide: A2CRPolicy) -> None:
    assert a2cr.score(block("x", last_access=500.0, hits=4, attention=0.0)) == pytest.approx(0.8)
    assert guide.score(block("x", last_access=500.0, hits=4, attention=0.0)) == pytest.approx(0.24 + 0.3)


def test_a2cr_score_follows_clock_and_touch(clock: ManualClock, a2cr: A2CRPolicy) -> None:
    stats = block("x", last_access=100.0, hits=1, attention=0.5)
    assert a2cr.score(stats) == pytest.approx(0.5)  # read once, just now
    clock.now = 400.0
    assert a2cr.score(stats) == pytest.approx(decayed_f(1, 300.0))  # c = 1/e
    a2cr.touch(stats)
    assert (stats.hits, stats.last_access) == (2, 400.0)
    assert a2cr.score(stats) == pytest.approx(2 / 3)  # the count decays since the last read only
    a2cr.touch(stats, at=350.0)  # a chain read that began earlier
    assert (stats.hits, stats.last_access) == (3, 350.0)


def test_decayed_frequency_resists_scans_and_forgets_idle_blocks(
    clock: ManualClock, a2cr: A2CRPolicy
) -> None:
    """Proven reuse outranks a fresh block read once (LRU evicts the reused one first), and an
    idle block's reads count less and less (LFU keeps it for ever)."""
    clock.now = 1000.0
    blocks = [
        block("reused", last_access=700.0, hits=4),  # c = 4·e^-1 = 1.47: F 0.595
        block("fresh", last_access=999.0, hits=1),  # c = 0.997: F 0.499
        block("idle", last_access=0.0, hits=50),  # c = 50·e^-3.33 = 1.78: F 0.641
        block("recent", last_access=990.0, hits=2),  # c = 2·e^-0.033 = 1.93: F 0.659
    ]
    assert [a2cr.score(b) for b in blocks] == pytest.approx(
        [decayed_f(4, 300.0), decayed_f(1, 1.0), decayed_f(50, 1000.0), decayed_f(2, 10.0)]
    )
    assert names(select_victims(a2cr, blocks, 40)) == ["fresh", "reused", "idle", "recent"]
    assert names(select_victims(LRUPolicy(clock), blocks, 40)) == ["idle", "reused", "recent", "fresh"]
    assert names(select_victims(LFUPolicy(clock), blocks, 40)) == ["fresh", "recent", "reused", "idle"]


def test_a2cr_weights_and_k_come_from_config(clock: ManualClock) -> None:
    config = A2crConfig(
        attention_weight=1.0, frequency_weight=2.0, recency_weight=0.0, frequency_horizon=100.0
    )
    policy = A2CRPolicy(config, clock, frequency_k=2.0)
    c = 3 * math.exp(-1.0)  # idle 100 s, horizon 100 s
    assert policy.score(block("x", 0.0, hits=3, attention=0.25)) == pytest.approx(0.25 + 2.0 * c / (c + 2.0))


@pytest.mark.parametrize("horizon", [0.0, -1.0, math.inf, math.nan])
def test_a2cr_rejects_bad_frequency_horizon(clock: ManualClock, horizon: float) -> None:
    with pytest.raises(ConfigError, match=r"a2cr_config\.frequency_horizon"):
        A2CRPolicy(A2crConfig(frequency_horizon=horizon), clock)


@pytest.mark.parametrize(
    "field", ["attention_weight", "frequency_weight", "recency_weight", "time_decay_factor"]
)
def test_a2cr_rejects_bad_config(clock: ManualClock, field: str) -> None:
    with pytest.raises(ConfigError, match=f"a2cr_config.{field}"):
        A2CRPolicy(A2crConfig(**{field: -0.1}), clock)


# --- adaptive tuning ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pressure", "threshold", "decay"),
    [
        (0.0, 0.2, 0.02),
        (0.7, 0.2, 0.02),
        (math.nextafter(0.7, 1.0), 0.3, 0.05),
        (0.9, 0.3, 0.05),
        (math.nextafter(0.9, 1.0), 0.4, 0.1),
        (1.0, 0.4, 0.1),
        (1.5, 0.4, 0.1),
    ],
)
def test_adaptive_table_boundaries(pressure: float, threshold: float, decay: float) -> None:
    assert adaptive_params(pressure) == TunedParams(threshold, decay)


@pytest.mark.parametrize("pressure", [-0.01, math.nan, math.inf])
def test_adaptive_rejects_bad_pressure(pressure: float) -> None:
    with pytest.raises(ValueError, match="pressure"):
        adaptive_params(pressure)


def test_a2cr_uses_tuned_values(guide: A2CRPolicy) -> None:
    stats = block("x", last_access=90.0, hits=4, attention=0.75)
    f = 0.3 * decayed_f(4, 10.0)
    assert guide.threshold == 0.2  # the config's, before any tune
    assert guide.tune(0.95) == TunedParams(0.4, 0.1)
    assert guide.threshold == 0.4
    assert guide.score(stats) == pytest.approx(0.3 + f + 0.3 * math.exp(-1.0))  # the decay is R's
    guide.tune(0.1)
    assert guide.score(stats) == pytest.approx(0.3 + f + 0.3 * math.exp(-0.2))


@pytest.mark.parametrize(
    ("pressure", "default", "operator"),
    [(0.5, (0.2, 0.02), (0.1, 0.004)), (0.8, (0.3, 0.05), (0.15, 0.01)), (0.95, (0.4, 0.1), (0.2, 0.02))],
)
def test_adaptation_scales_the_configured_values(
    clock: ManualClock, pressure: float, default: tuple[float, float], operator: tuple[float, float]
) -> None:
    """threshold = T(p) · configured / 0.2, decay = D(p) · configured / 0.05: the guide's table
    itself for the default config, a bounded adjustment around an operator's values."""
    assert A2CRPolicy(A2crConfig(), clock).tune(pressure) == TunedParams(*default)  # exactly the table
    own = A2crConfig(eviction_threshold=0.1, time_decay_factor=0.01)
    tuned = A2CRPolicy(own, clock).tune(pressure)
    assert (tuned.eviction_threshold, tuned.time_decay_factor) == pytest.approx(operator)
    fixed = A2CRPolicy(A2crConfig(eviction_threshold=0.1, time_decay_factor=0.01, adaptive=False), clock)
    assert fixed.tune(pressure) == TunedParams(0.1, 0.01) == fixed.params  # adaptive: false keeps them


def test_adapted_threshold_stays_in_0_1(clock: ManualClock) -> None:
    assert adaptive_params(0.95, A2crConfig(eviction_threshold=0.8)).eviction_threshold == 1.0
    assert adaptive_params(0.5, A2crConfig(eviction_threshold=-0.1)).eviction_threshold == 0.0
    with pytest.raises(ValueError, match="pressure"):  # checked with adaptation off too
        A2CRPolicy(A2crConfig(adaptive=False), clock).tune(math.nan)


def test_baselines_ignore_tune(clock: ManualClock) -> None:
    for policy in (LRUPolicy(clock), LFUPolicy(clock)):
        assert policy.tune(0.99) is None
        assert policy.threshold is None


# --- selection ------------------------------------------------------------------------


def corpus() -> list[BlockStats]:
    """At now = 100: an old, hot system-prompt block, fresh one-off blocks, a cold document block."""
    return [
        block("sys", last_access=10.0, hits=30, attention=0.9),
        block("doc", last_access=40.0, hits=2, attention=0.4),
        block("oneoff-a", last_access=99.0, hits=1, attention=0.2),
        block("oneoff-b", last_access=98.0, hits=1, attention=0.3),
        block("chat", last_access=95.0, hits=3, attention=0.5),
    ]


def test_eviction_order_per_policy(clock: ManualClock, a2cr: A2CRPolicy) -> None:
    everything = 10 * len(corpus())
    assert names(select_victims(LRUPolicy(clock), corpus(), everything)) == [
        "sys", "doc", "chat", "oneoff-b", "oneoff-a",
    ]  # fmt: skip
    assert names(select_victims(LFUPolicy(clock), corpus(), everything)) == [
        "oneoff-b", "oneoff-a", "doc", "chat", "sys",
    ]  # fmt: skip
    # a2cr scores, c / (1 + c) with c = hits·e^(-idle/300): oneoff-b 0.498, oneoff-a 0.499,
    # doc (c 1.64) 0.621, chat (c 2.95) 0.747, sys (c 22.2) 0.957
    assert names(select_victims(a2cr, corpus(), everything)) == ["oneoff-b", "oneoff-a", "doc", "chat", "sys"]


def test_a2cr_keeps_hot_old_block_that_lru_evicts(clock: ManualClock, a2cr: A2CRPolicy) -> None:
    assert names(select_victims(LRUPolicy(clock), corpus(), 10)) == ["sys"]
    assert names(select_victims(a2cr, corpus(), 10)) == ["oneoff-b"]


def test_select_victims_stops_at_enough_bytes(clock: ManualClock) -> None:
    blocks = [block("a", 1.0, size=30), block("b", 2.0, size=30), block("c", 3.0, size=30)]
    lru = LRUPolicy(clock)
    assert names(select_victims(lru, blocks, 31)) == ["a", "b"]
    assert names(select_victims(lru, blocks, 30)) == ["a"]
    assert names(select_victims(lru, blocks, 1000)) == ["a", "b", "c"]
    assert select_victims(lru, blocks, 0) == []


EVERY_POLICY = [
    LRUPolicy,
    LFUPolicy,
    lambda c: A2CRPolicy(A2crConfig(), c),
    lambda c: A2CRPolicy(GUIDE_WEIGHTS, c),
]


@pytest.mark.parametrize("make", EVERY_POLICY)
def test_ties_are_deterministic(clock: ManualClock, make) -> None:
    policy: EvictionPolicy = make(clock)
    # Same hits and attention: "c" goes first (older, or lower score), then a, b, d tie and go by hash.
    blocks = [block("b", 50.0), block("a", 50.0), block("c", 40.0), block("d", 50.0)]
    for permutation in itertools.permutations(blocks):
        assert names(select_victims(policy, list(permutation), 1000)) == ["c", "a", "b", "d"]


@pytest.mark.parametrize("make", EVERY_POLICY)
def test_a_chain_read_together_loses_its_leaves_first(clock: ManualClock, make) -> None:
    """Blocks read at one moment tie on every score: the deepest goes first, the root last (a block
    is reusable only behind its whole prefix), whatever the hashes say."""
    policy: EvictionPolicy = make(clock)
    chain = [block(name, 50.0) for name in ("d", "c", "b", "a")]  # root "d" ... leaf "a"
    for position, stats in enumerate(chain):
        stats.position = position
    other = block("z", 40.0)  # as often, but read earlier: first under every policy
    for permutation in itertools.permutations([*chain, other]):
        assert names(select_victims(policy, list(permutation), 1000)) == ["z", "a", "b", "c", "d"]
    with pytest.raises(ValueError, match="position"):
        BlockStats(BlockHash("x"), 1, created=0.0, last_access=0.0, position=-1)


def test_promotion_bar_is_the_residents_lower_median(clock: ManualClock, a2cr: A2CRPolicy) -> None:
    """An NVMe hit enters a full CPU tier only if it was read more often than the median resident."""
    residents = [block("once", 0.0, hits=1), block("five", 0.0, hits=5), block("three", 0.0, hits=3)]
    assert a2cr.promotion_bar(residents) == 3
    assert (admits(3, 3), admits(3, 4), admits(None, 1)) == (False, True, True)
    # The lower median, in any order: [1, 1, 1, 2] -> 1 (the least-read twice-read resident would be 2)
    fresh = [block(f"new{i}", 0.0, hits=1) for i in range(3)] + [block("twice", 0.0, hits=2)]
    for permutation in itertools.permutations(fresh):
        assert a2cr.promotion_bar(permutation) == 1
    assert a2cr.promotion_bar([*fresh, block("hot", 0.0, hits=9)]) == 1  # [1, 1, 1, 2, 9]
    assert a2cr.promotion_bar([block("a", 0.0, hits=h) for h in (4, 2, 8, 6)]) == 4  # [2, 4, 6, 8]
    # A tier of mostly once-read blocks admits a block read twice before, not one read once.
    assert (admits(1, 1), admits(1, 2)) == (False, True)
    assert a2cr.promotion_bar([block("once", 0.0, hits=1)] * 3) is None  # nothing read twice: admit all
    assert a2cr.promotion_bar([]) is None
    off = A2CRPolicy(A2crConfig(promotion_admission=False), clock)
    assert off.promotion_bar(residents) is None
    assert (
        LRUPolicy(clock).promotion_bar(residents) is None
        and LFUPolicy(clock).promotion_bar(residents) is None
    )


def test_below_threshold(clock: ManualClock, a2cr: A2CRPolicy) -> None:
    clock.now = 400.0  # about the frequency horizon since the one-off blocks were read
    # scores: sys (c 8.18) 0.891, chat (c 1.09) 0.520, doc (c 0.60) 0.376,
    # oneoff-a (c 0.367) 0.2683, oneoff-b (c 0.366) 0.2676
    assert names(below_threshold(a2cr, corpus())) == []
    a2cr.tune(0.8)  # threshold 0.3
    assert names(below_threshold(a2cr, corpus())) == ["oneoff-b", "oneoff-a"]
    a2cr.tune(0.95)  # threshold 0.4
    assert names(below_threshold(a2cr, corpus())) == ["oneoff-b", "oneoff-a", "doc"]
    assert below_threshold(LRUPolicy(clock), corpus()) == []
    assert below_threshold(LFUPolicy(clock), corpus()) == []


def test_make_policy(clock: ManualClock) -> None:
    assert isinstance(make_policy(TierPolicy.A2CR, A2crConfig(), clock), A2CRPolicy)
    assert make_policy(TierPolicy.LRU, A2crConfig(), clock).name == "lru"
    assert make_policy(load_config().tier.policy, A2crConfig(), clock).name == "a2cr"
    # An unknown name never gets here: the config refuses it at load.
    with pytest.raises(ConfigError, match=r"tier\.policy: expected one of 'a2cr', 'lru', 'lfu', got 'arc'"):
        load_config(None, {}, {"tier.policy": "arc"})


# --- watermarks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("used", "capacity", "expected"),
    [
        (0, 100, 0),
        (89, 100, 0),
        (90, 100, 10),
        (100, 100, 20),
        (130, 100, 50),
        (899, 1000, 0),
        (950, 1000, 150),
    ],
)
def test_bytes_to_free(used: int, capacity: int, expected: int) -> None:
    assert bytes_to_free(used, capacity) == expected


def test_bytes_to_free_custom_watermarks() -> None:
    assert bytes_to_free(50, 100, high=0.5, low=0.25) == 25
    assert bytes_to_free(49, 100, high=0.5, low=0.25) == 0


@pytest.mark.parametrize(
    "args", [(10, 0, 0.9, 0.8), (-1, 100, 0.9, 0.8), (10, 100, 0.7, 0.8), (10, 100, 1.1, 0.8)]
)
def test_bytes_to_free_rejects_bad_input(args: tuple) -> None:
    with pytest.raises(ValueError):
        bytes_to_free(*args)


# --- the replay's store (benchmark/policy_replay.py) ----------------------------------


def _load_replay():
    path = Path(__file__).resolve().parents[2] / "benchmark" / "policy_replay.py"
    spec = importlib.util.spec_from_file_location("policy_replay", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("policy_replay", module)
    spec.loader.exec_module(module)
    return module


replay_module = _load_replay()


def _store(copies, nvme_blocks: int = 10):
    r = replay_module
    capacity = {r.Level.CPU: 2, r.Level.NVME: nvme_blocks}  # 1-byte blocks; watermarks 90 % / 80 %
    return r.TwoLevelStore("lru", A2crConfig(), capacity, cleanup=False, copies=copies)


def _serve(store, time: float, *blocks: str) -> None:
    store.serve(replay_module.Request(time, blocks, tuple(1 / len(blocks) for _ in blocks)), 1)
    store.check_integrity()


@pytest.mark.parametrize(("copies", "written"), [("keep", 2), ("exclusive", 3)])
def test_replay_promotion_keeps_the_nvme_copy(copies: str, written: int) -> None:
    store = _store(replay_module.Copies(copies))
    _serve(store, 1.0, "doc:b", "doc:a")  # CPU full: a (tie on time, the deeper first) written to NVMe
    _serve(store, 2.0, "doc:a")  # NVMe hit, promoted; b demoted (written)
    _serve(store, 3.0, "doc:c")  # a demoted again: free while its NVMe copy exists
    assert (store.count["nvme"], store.count["miss"], store.count["bytes_promoted"]) == (1, 3, 1)
    assert store.count["bytes_demoted"] == written
    assert sorted(store.blocks[replay_module.Level.NVME]) == ["doc:a", "doc:b"]


@pytest.mark.parametrize(("copies", "kept"), [("keep", "doc:a"), ("keep-redundant-first", "doc:b")])
def test_replay_nvme_may_drop_redundant_copies_first(copies: str, kept: str) -> None:
    store = _store(replay_module.Copies(copies), nvme_blocks=2)
    _serve(store, 1.0, "doc:b", "doc:a")  # a, the leaf, demoted
    _serve(store, 2.0, "doc:a")  # NVMe {a (also in CPU), b}: over 90 %, one to drop
    assert list(store.blocks[replay_module.Level.NVME]) == [kept]


def test_replay_all_reports_every_policy() -> None:
    result = replay_module.replay_all(cpu_blocks=50, nvme_blocks=200, seed=0, duration_s=120.0)
    for key in ("hit_rate", "bytes_moved"):
        assert set(result[key]) == {"a2cr", "lru", "lfu"}
    assert all(0.0 < rate < result["params"]["ideal_hit_rate"] for rate in result["hit_rate"].values())


def test_room_to_make_frees_down_to_the_low_watermark_only_when_needed() -> None:
    assert room_to_make(used=60, incoming=40, capacity=100, low=0.8) == 0  # fits exactly
    assert room_to_make(used=90, incoming=20, capacity=100, low=0.8) == 30  # 110 - 80
    assert room_to_make(used=0, incoming=150, capacity=100, low=0.8) == 70  # never fits: callers refuse it


def test_redundant_copies_are_victims_before_sole_copies(clock: ManualClock) -> None:
    policy = LRUPolicy(clock)
    blocks = [block("a", 1.0), block("b", 2.0), block("c", 3.0), block("d", 4.0)]  # LRU order a b c d
    assert names(select_victims_redundant_first(policy, blocks, 15, {"c", "d"})) == ["c", "d"]
    assert names(select_victims_redundant_first(policy, blocks, 25, {"c", "d"})) == ["c", "d", "a"]
    assert names(select_victims_redundant_first(policy, blocks, 15, set())) == ["a", "b"]


def test_replay_admits_an_nvme_hit_read_more_often_than_the_median_resident() -> None:
    """A²CR's admission in the replay's store: CPU holds b (read twice) and three blocks read once
    (median 1), so a block read once before stays on NVMe when read (served from there), and is
    promoted when read again, having been read twice before (b, the least-read twice-read resident,
    would have kept it out)."""
    r = replay_module
    capacity = {r.Level.CPU: 5, r.Level.NVME: 20}  # 1-byte blocks; watermarks 90 % / 80 %
    store = r.TwoLevelStore("a2cr", A2crConfig(), capacity, cleanup=False)
    for t, name in enumerate("abcde", start=1):
        _serve(store, float(t), f"doc:{name}")  # the fifth crosses 90 %: a, the oldest, demoted
    _serve(store, 5.5, "doc:b")
    cpu, nvme = store.blocks[r.Level.CPU], store.blocks[r.Level.NVME]
    assert sorted(cpu) == ["doc:b", "doc:c", "doc:d", "doc:e"] and list(nvme) == ["doc:a"]
    assert store.policy[r.Level.CPU].promotion_bar(cpu.values()) == 1
    _serve(store, 6.0, "doc:a")  # read once before: not more than the median resident
    assert (store.count["nvme"], store.count["not_admitted"], "doc:a" in cpu) == (1, 1, False)
    _serve(store, 7.0, "doc:a")  # read twice before: promoted, its NVMe copy kept
    assert (store.count["nvme"], store.count["not_admitted"], "doc:a" in cpu) == (2, 1, True)
    assert sorted(nvme) == ["doc:a", "doc:c"]  # the promotion displaced c, the oldest once-read block
    assert (store.count["bytes_promoted"], store.count["bytes_demoted"]) == (2, 2)
