"""Routing policies on constructed states: exact choices and exact MoR costs."""

from __future__ import annotations

import dataclasses
import re

import pytest

from wicore.config import SchedulerConfig, load_config
from wicore.errors import ConfigError
from wicore.kv.block import StorageTier
from wicore.scheduler.router import LeastLoadedRouter, MoRRouter, RoundRobinRouter, make_router
from wicore.workload import WorkloadType

from scheduling import request, worker

CONFIG = SchedulerConfig()


def test_mor_costs_term_by_term() -> None:
    mor = MoRRouter(CONFIG)
    # 320 prompt tokens (19 reusable blocks of 16), 64 new: a = min(1, 384/512) = 0.75.
    r = request("r", prompt=320, new=64, blocks=19, device={"b": 19})
    a, b = worker("a"), worker("b", inflight=2)
    cost_a, cost_b = mor.cost(r, a, 0), mor.cost(r, b, 19)
    assert (cost_a.device, cost_a.prefill, cost_a.queue, cost_a.total) == (0.375, 0.625, 0.0, 1.0)
    # b: 320 - 19*16 = 16 tokens left to compute; 2 of 8 slots taken.
    assert (cost_b.prefill, cost_b.queue) == (16 / 512, 0.25)
    assert cost_b.device == pytest.approx(0.375 + 0.3 * 0.25)
    assert cost_b.total == pytest.approx(0.45 + 16 / 512 + 0.25)
    assert mor.choose(r, [a, b], {"b": 19}).worker_id == "b"


def test_mor_without_prefix_information_is_least_loaded() -> None:
    mor = MoRRouter(CONFIG)
    r = request("r", prompt=200)
    assert (
        mor.choose(
            r, [worker("a", inflight=3), worker("b", inflight=1), worker("c", inflight=2)], {}
        ).worker_id
        == "b"
    )


def test_mor_ties_take_turns() -> None:
    mor = MoRRouter(CONFIG)
    a, b = worker("a"), worker("b")
    a.last_picked, b.last_picked = 5.0, 3.0
    assert mor.choose(request("r"), [a, b], {}).worker_id == "b"
    b.last_picked = 7.0
    assert mor.choose(request("r"), [a, b], {}).worker_id == "a"


def test_the_prefix_holder_wins_until_it_runs_max_imbalance_more_requests() -> None:
    mor = MoRRouter(CONFIG)  # max_imbalance 4
    r = request("r", prompt=1024, new=64, blocks=63, device={"hot": 63})
    idle, hot = worker("idle", max_batch=16), worker("hot", inflight=4, max_batch=16)
    assert mor.choose(r, [idle, hot], {"hot": 63}).worker_id == "hot"
    hot.inflight = 5  # 5 above the least loaded: the death-spiral guard sends it elsewhere
    assert mor.choose(r, [idle, hot], {"hot": 63}).worker_id == "idle"


def test_tier_blocks_are_priced_by_where_they_sit() -> None:
    mor = MoRRouter(CONFIG)
    tier = (StorageTier.CPU,) * 10 + (StorageTier.NVME,) * 5 + (None,) * 5
    r = request("r", prompt=330, blocks=20, tier=tier)
    w = worker("w")
    # Nothing on the device: blocks 0-9 from the CPU tier (0.2 each), 10-14 from NVMe (0.5 each).
    assert mor.uncomputed_tokens(r, w, 0) == 330 - 16 * 15 + 16 * (10 * 0.2 + 5 * 0.5)
    # 5 blocks on the device: the tier supplies 5 (CPU) + 5 (NVMe) after them.
    assert mor.uncomputed_tokens(r, w, 5) == 330 - 16 * 15 + 16 * (5 * 0.2 + 5 * 0.5)
    # A gap ends the run: what follows it cannot be reused.
    gap = request("g", prompt=330, blocks=20, tier=(StorageTier.CPU, None) + (StorageTier.CPU,) * 18)
    assert mor.uncomputed_tokens(gap, w, 0) == 330 - 16 * 1 + 16 * 0.2


def test_tier_blocks_are_priced_by_what_the_worker_measured() -> None:
    """price = load seconds per block x prefill tokens/s / block size, capped at 1: a block that
    loads slower than it recomputes costs what a miss costs (the worker recomputes it)."""
    mor = MoRRouter(CONFIG)
    w = worker("w")
    w.load.prefill_tokens_per_s = 1600.0  # a 16-token block recomputes in 10 ms
    w.load.load_s_per_block = {"cpu": 0.001, "nvme": 0.025}  # loads in 1 ms / 25 ms
    assert mor.tier_price(w, StorageTier.CPU, 16) == pytest.approx(0.1)
    assert mor.tier_price(w, StorageTier.NVME, 16) == 1.0
    r = request("r", prompt=330, blocks=20, tier=(StorageTier.CPU,) * 10 + (StorageTier.NVME,) * 10)
    assert mor.uncomputed_tokens(r, w, 0) == pytest.approx(330 - 16 * 20 + 16 * (10 * 0.1 + 10 * 1.0))
    unmeasured = worker("u")  # the configured prices until the worker has measured
    assert mor.tier_price(unmeasured, StorageTier.NVME, 16) == CONFIG.tier_nvme_cost
    w.load.load_s_per_block = {"cpu": 0.001}  # NVMe not measured yet
    assert mor.tier_price(w, StorageTier.NVME, 16) == CONFIG.tier_nvme_cost


def test_mor_wait_budget_is_the_prefill_time_the_busy_holder_saves() -> None:
    mor = MoRRouter(CONFIG)
    r = request("r", prompt=400, blocks=24, device={"holder": 20})
    chosen, holder = worker("chosen", inflight=7), worker("holder", inflight=8)
    # chosen computes 400 tokens, the holder 400 - 20*16 = 80, both at the assumed 1,000/s.
    assert mor.wait_budget(r, [chosen], chosen, [holder], {"holder": 20}) == pytest.approx(0.32)
    chosen.load.prefill_tokens_per_s = 4000.0  # chosen measured faster: 0.1 s against 0.08 s
    assert mor.wait_budget(r, [chosen], chosen, [holder], {"holder": 20}) == pytest.approx(0.02)
    holder.load.prefill_tokens_per_s = 500.0  # the holder slower still: its 80 tokens take 0.16 s
    assert mor.wait_budget(r, [chosen], chosen, [holder], {"holder": 20}) == 0.0
    chosen.load.prefill_tokens_per_s = holder.load.prefill_tokens_per_s = 0.0
    assert mor.wait_budget(r, [chosen], chosen, [holder], {"holder": 20, "chosen": 20}) == 0.0
    # one block saved: 16 tokens, a block's prefill, the least worth waiting for
    assert mor.wait_budget(r, [chosen], chosen, [holder], {"holder": 20, "chosen": 19}) == pytest.approx(
        0.016
    )
    assert mor.wait_budget(r, [chosen], chosen, [], {}) == 0.0
    assert LeastLoadedRouter(CONFIG).wait_budget(r, [chosen], chosen, [holder], {"holder": 20}) == 0.0
    assert RoundRobinRouter(CONFIG).wait_budget(r, [chosen], chosen, [holder], {"holder": 20}) == 0.0


def test_mor_waits_only_for_a_worker_it_would_choose_if_it_had_a_slot() -> None:
    mor = MoRRouter(CONFIG)
    r = request("r", prompt=400, blocks=24, device={"holder": 20})
    holder = worker("holder", inflight=8)
    idle = worker("idle")  # 0 in flight: the holder, 7 with a slot freed, is past max_imbalance (4)
    assert mor.choose(r, [idle, dataclasses.replace(holder, inflight=7)], {"holder": 20}) is idle
    assert mor.wait_budget(r, [idle], idle, [holder], {"holder": 20}) == 0.0
    # Within max_imbalance but cheaper to compute anew on the nearly idle worker: MoR's own costs
    # (queue 7/8 against 3/8 outweighs the prefill term) send it there, so it does not wait either.
    light = worker("light", inflight=3)
    assert mor.choose(r, [light, dataclasses.replace(holder, inflight=7)], {"holder": 20}) is light
    assert mor.wait_budget(r, [light], light, [holder], {"holder": 20}) == 0.0


def test_a_tier_on_another_node_is_a_miss() -> None:
    """A worker loads only from its own node's tier: blocks held by another node's tier are
    recomputed, so routing must price them as such and prefer the worker that can load them."""
    mor = MoRRouter(CONFIG)
    r = request("r", prompt=330, blocks=20, tier=(StorageTier.CPU,) * 20, node="node-a")
    near, far = worker("near", tier_node="node-a"), worker("far", tier_node="node-b")
    assert mor.uncomputed_tokens(r, near, 0) == pytest.approx(330 - 16 * 20 + 16 * 20 * 0.2)
    assert mor.uncomputed_tokens(r, far, 0) == 330
    assert mor.uncomputed_tokens(r, worker("unknown", tier_node=""), 0) == 330  # its tier never answered
    assert mor.choose(r, [far, near], {}).worker_id == "near"


@pytest.mark.parametrize(
    ("workload", "device"),
    [
        (WorkloadType.CREATIVE_WRITING, "gpu:0"),
        (WorkloadType.CODE_GENERATION, "cpu"),
        (WorkloadType.SIMPLE_QA, "cpu"),
        (WorkloadType.DEFAULT, "cpu"),
    ],
)
def test_workload_thresholds_split_a_mid_sized_request_between_cpu_and_gpu(
    workload: WorkloadType, device: str
) -> None:
    mor = MoRRouter(CONFIG)
    r = request("r", prompt=141, new=64, workload=workload)  # 205 / 512 tokens: a = 0.4 + 0.5 - threshold
    cpu, gpu = worker("cpu-w", "cpu"), worker("gpu-w", "gpu:0")
    assert mor.choose(r, [cpu, gpu], {}).device == device


def test_heavy_requests_go_to_the_gpu_and_light_qa_to_the_cpu_until_it_is_busy() -> None:
    mor = MoRRouter(CONFIG)
    cpu, gpu = worker("cpu-w", "cpu"), worker("gpu-w", "gpu:0")
    assert mor.choose(request("big", prompt=900, new=200), [cpu, gpu], {}).worker_id == "gpu-w"
    qa = request("qa", prompt=32, new=32, workload=WorkloadType.SIMPLE_QA)  # a = 0: CPU costs 0.5 less
    assert mor.choose(qa, [cpu, gpu], {}).worker_id == "cpu-w"
    cpu.inflight = 4  # queue 0.5 + util 0.3*0.5 = 0.65 > the GPU's 0.5
    assert mor.choose(qa, [cpu, gpu], {}).worker_id == "gpu-w"


def test_round_robin_takes_turns_skipping_busy_workers() -> None:
    rr = RoundRobinRouter(CONFIG)
    a, b, c = worker("a"), worker("b"), worker("c")
    picks = [rr.choose(request("r"), ws, {}).worker_id for ws in ([a, b, c], [a, b, c], [a, c], [a, b, c])]
    assert picks == ["a", "b", "c", "a"]


def test_least_loaded_ignores_prefixes() -> None:
    ll = LeastLoadedRouter(CONFIG)
    r = request("r", prompt=1024, blocks=63, device={"a": 63})
    assert ll.choose(r, [worker("a", inflight=1), worker("b", inflight=0)], {"a": 63}).worker_id == "b"


def test_policies_by_name() -> None:
    for name, cls in [
        ("mor", MoRRouter),
        ("round_robin", RoundRobinRouter),
        ("least_loaded", LeastLoadedRouter),
    ]:
        config = load_config(None, {}, {"scheduler.routing_policy": name})
        assert isinstance(make_router(config.scheduler), cls)
    # An unknown name never reaches make_router: the config refuses it at load.
    with pytest.raises(
        ConfigError,
        match=r"scheduler\.routing_policy: expected one of 'mor', 'round_robin', 'least_loaded', got 'fast'",
    ):
        load_config(None, {}, {"scheduler.routing_policy": "fast"})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("scheduler.prefix_wait_factor", -1.0),
        ("scheduler.prefix_wait_factor", float("nan")),
        ("scheduler.assumed_prefill_tokens_per_s", 0.0),
        ("scheduler.assumed_prefill_tokens_per_s", float("inf")),
        ("worker.tier_loads", "sometimes"),
    ],
)
def test_bad_routing_cost_settings_are_refused_naming_the_field(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(key)):
        load_config(None, {}, {key: value})


def test_prefix_wait_factor_scales_the_wait_and_zero_turns_it_off() -> None:
    r = request("r", prompt=400, blocks=24, device={"holder": 20})
    chosen, holder = worker("chosen", inflight=7), worker("holder", inflight=8)
    twice = MoRRouter(SchedulerConfig(prefix_wait_factor=2.0))
    assert twice.wait_budget(r, [chosen], chosen, [holder], {"holder": 20}) == pytest.approx(0.64)
    never = MoRRouter(SchedulerConfig(prefix_wait_factor=0.0))
    assert never.wait_budget(r, [chosen], chosen, [holder], {"holder": 20}) == 0.0
