"""What the worker measures about itself (costs.py) and the load-or-recompute choice."""

from __future__ import annotations

import pytest

from wicore.kv.block import StorageTier
from wicore.worker.costs import MIN_PREFILL_TOKENS, WARMUP_STEPS, CostMeter, blocks_worth_loading

CPU, NVME = StorageTier.CPU, StorageTier.NVME


def test_prefill_speed_is_an_average_over_prefill_steps_after_the_warmup() -> None:
    meter = CostMeter()
    assert meter.prefill_tokens_per_s == 0.0  # nothing measured
    meter.record_step(0.05, 0, 64)  # 64 decode rows (say): not a prefill measurement
    meter.record_step(0.05, MIN_PREFILL_TOKENS - 1, 100)  # too few prompt tokens
    for _ in range(WARMUP_STEPS):
        meter.record_step(10.0, 128, 128)  # the first prefill steps warm kernels up: not counted
    assert meter.prefill_tokens_per_s == 0.0
    meter.record_step(0.128, MIN_PREFILL_TOKENS, 128)  # 64 prompt tokens + 64 decode rows, 1 ms a row
    assert meter.prefill_s_per_token.value == pytest.approx(0.001)
    meter.record_step(0.256, 128, 128)  # 2 ms a token: EWMA with weight 0.2
    assert meter.prefill_s_per_token.value == pytest.approx(0.8 * 0.001 + 0.2 * 0.002)
    assert meter.prefill_tokens_per_s == pytest.approx(1 / 0.0012)


def test_load_time_per_block_is_measured_on_calls_one_tier_served() -> None:
    meter = CostMeter()
    meter.record_load(0.004, {CPU: 4})
    meter.record_load(0.010, {CPU: 1, NVME: 4})  # mixed: no measurement of either
    meter.record_load(0.008, {CPU: 4, NVME: 0})
    meter.record_load(0.0, {CPU: 4})  # no time: ignored
    meter.record_load(0.1, {})
    assert meter.load_seconds() == pytest.approx({CPU: 0.8 * 0.001 + 0.2 * 0.002})
    meter.record_load(0.04, {NVME: 4})
    assert meter.load_seconds()[NVME] == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("tiers", "load_s", "recompute_s", "want"),
    [
        ((CPU,) * 4, {CPU: 0.001}, 0.01, 4),  # loading is faster: all
        ((CPU,) * 4, {CPU: 0.02}, 0.01, 0),  # slower: none
        ((CPU,) * 4, {CPU: 0.01}, 0.01, 0),  # equal: nothing saved, recompute
        ((CPU, CPU, NVME, NVME), {CPU: 0.001, NVME: 0.02}, 0.01, 2),  # up to the slow tier
        # two slow NVMe blocks between fast CPU ones are worth loading through
        ((CPU, NVME, CPU, CPU, CPU), {CPU: 0.001, NVME: 0.015}, 0.01, 5),
        ((NVME, CPU), {CPU: 0.001, NVME: 0.05}, 0.01, 0),  # the CPU block cannot pay for the NVMe one
        ((CPU, NVME), {CPU: 0.001}, 0.01, 2),  # NVMe not measured yet: loaded (and so measured)
        ((NVME,) * 3, {NVME: 1.0}, 0.0, 3),  # prefill not measured yet: load
        ((), {}, 0.01, 0),
    ],
)
def test_blocks_worth_loading(
    tiers: tuple[StorageTier, ...], load_s: dict[StorageTier, float], recompute_s: float, want: int
) -> None:
    assert blocks_worth_loading(tiers, load_s, recompute_s) == want
