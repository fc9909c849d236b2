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


def test_one_sample_does_not_outrank_steady_evidence(a2cr: A2CRPolicy) -> None:
    """A one-off block read once with a large share vs a chat block read four times at a modest share."""
    one_off, chat = block("one-off", 100.0, hits=4), block("chat", 100.0, hits=4)
    observe_attention(one_off, 0.3, 10)  # A_obs 0.75
    for _ in range(4):
        observe_attention(chat, 0.1, 10)  # A_obs 0.5
    observe_attention(chat, 0.3, 10)
    # one-off 0.5 + 0.25/3 = 0.583; chat (1 + 4·0.5 + 0.75) / 7 = 0.536: closer than one sample says
    assert (one_off.attention, chat.attention) == (pytest.approx(0.5 + 0.25 / 3), pytest.approx(3.75 / 7))
    assert a2cr.score(one_off) - a2cr.score(chat) == pytest.approx(0.4 * (0.5 + 0.25 / 3 - 3.75 / 7))


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


def test_a2cr_score_exact(a2cr: A2CRPolicy) -> None:
    stats = block("x", last_access=90.0, hits=4, attention=0.75)
    # 0.4·0.75 + 0.3·4/(4+4) + 0.3·exp(-0.05·10)
    assert a2cr.score(stats) == pytest.approx(0.3 + 0.15 + 0.3 * math.exp(-0.5), abs=1e-12)


def test_a2cr_score_of_future_access_counts_as_now(a2cr: A2CRPolicy) -> None:
    assert a2cr.score(block("x", last_access=500.0, hits=4, attention=0.0)) == pytest.approx(0.15 + 0.3)


def test_a2cr_score_follows_clock_and_touch(clock: ManualClock, a2cr: A2CRPolicy) -> None:
    stats = block("x", last_access=100.0, hits=0, attention=0.5)
    assert a2cr.score(stats) == pytest.approx(0.2 + 0.0 + 0.3)
    clock.now = 120.0
    assert a2cr.score(stats) == pytest.approx(0.2 + 0.3 * math.exp(-1.0))
    a2cr.touch(stats)
    assert (stats.hits, stats.last_access) == (1, 120.0)
    assert a2cr.score(stats) == pytest.approx(0.2 + 0.3 * 0.2 + 0.3)


def test_a2cr_weights_and_k_come_from_config(clock: ManualClock) -> None:
    config = A2crConfig(attention_weight=1.0, frequency_weight=2.0, recency_weight=0.0)
    policy = A2CRPolicy(config, clock, frequency_k=1.0)
    assert policy.score(block("x", 0.0, hits=3, attention=0.25)) == pytest.approx(0.25 + 2.0 * 0.75)


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


def test_a2cr_uses_tuned_values(a2cr: A2CRPolicy) -> None:
    stats = block("x", last_access=90.0, hits=4, attention=0.75)
    assert a2cr.threshold == 0.2  # the config's, before any tune
    assert a2cr.tune(0.95) == TunedParams(0.4, 0.1)
    assert a2cr.threshold == 0.4
    assert a2cr.score(stats) == pytest.approx(0.45 + 0.3 * math.exp(-1.0))
    a2cr.tune(0.1)
    assert a2cr.score(stats) == pytest.approx(0.45 + 0.3 * math.exp(-0.2))


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
    # a2cr scores: doc 0.16+0.1+0.3e^-3 = 0.275, oneoff-a 0.08+0.06+0.3e^-0.05 = 0.425,
    # oneoff-b 0.12+0.06+0.3e^-0.1 = 0.451, chat 0.2+0.129+0.3e^-0.25 = 0.562,
    # sys 0.36+0.265+0.3e^-4.5 = 0.628
    assert names(select_victims(a2cr, corpus(), everything)) == ["doc", "oneoff-a", "oneoff-b", "chat", "sys"]


def test_a2cr_keeps_hot_old_block_that_lru_evicts(clock: ManualClock, a2cr: A2CRPolicy) -> None:
    assert names(select_victims(LRUPolicy(clock), corpus(), 10)) == ["sys"]
    assert names(select_victims(a2cr, corpus(), 10)) == ["doc"]


def test_select_victims_stops_at_enough_bytes(clock: ManualClock) -> None:
    blocks = [block("a", 1.0, size=30), block("b", 2.0, size=30), block("c", 3.0, size=30)]
    lru = LRUPolicy(clock)
    assert names(select_victims(lru, blocks, 31)) == ["a", "b"]
    assert names(select_victims(lru, blocks, 30)) == ["a"]
    assert names(select_victims(lru, blocks, 1000)) == ["a", "b", "c"]
    assert select_victims(lru, blocks, 0) == []


@pytest.mark.parametrize("make", [LRUPolicy, LFUPolicy, lambda c: A2CRPolicy(A2crConfig(), c)])
def test_ties_are_deterministic(clock: ManualClock, make) -> None:
    policy: EvictionPolicy = make(clock)
    # Same hits and attention: "c" goes first (older, or lower score), then a, b, d tie and go by hash.
    blocks = [block("b", 50.0), block("a", 50.0), block("c", 40.0), block("d", 50.0)]
    for permutation in itertools.permutations(blocks):
        assert names(select_victims(policy, list(permutation), 1000)) == ["c", "a", "b", "d"]


def test_below_threshold(clock: ManualClock, a2cr: A2CRPolicy) -> None:
    clock.now = 1000.0  # recency has decayed to ~0 for every block
    # scores: sys 0.36+0.264 = 0.624, chat 0.2+0.129 = 0.329, doc 0.16+0.1 = 0.26,
    # oneoff-b 0.12+0.06 = 0.18, oneoff-a 0.08+0.06 = 0.14
    assert names(below_threshold(a2cr, corpus())) == ["oneoff-a", "oneoff-b"]
    a2cr.tune(0.8)  # threshold 0.3
    assert names(below_threshold(a2cr, corpus())) == ["oneoff-a", "oneoff-b", "doc"]
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
    _serve(store, 1.0, "doc:a", "doc:b")  # CPU full: a (tie on time, hash first) written to NVMe
    _serve(store, 2.0, "doc:a")  # NVMe hit, promoted; b demoted (written)
    _serve(store, 3.0, "doc:c")  # a demoted again: free while its NVMe copy exists
    assert (store.count["nvme"], store.count["miss"], store.count["bytes_promoted"]) == (1, 3, 1)
    assert store.count["bytes_demoted"] == written
    assert sorted(store.blocks[replay_module.Level.NVME]) == ["doc:a", "doc:b"]


@pytest.mark.parametrize(("copies", "kept"), [("keep", "doc:a"), ("keep-redundant-first", "doc:b")])
def test_replay_nvme_may_drop_redundant_copies_first(copies: str, kept: str) -> None:
    store = _store(replay_module.Copies(copies), nvme_blocks=2)
    _serve(store, 1.0, "doc:a", "doc:b")
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
