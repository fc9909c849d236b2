"""The worker's choice between loading a prefix from the tier and recomputing it, against a
real tier process over gRPC: loads are timed, and blocks whose measured load is slower than
their measured recompute are recomputed (a tier hit is never slower than a miss)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import torch

from wicore.kv.block import Codec, StorageTier
from wicore.kv.client import TierClient
from wicore.kv.hashing import BlockHash
from wicore.server import CHANNEL_OPTIONS
from wicore.v1 import tier_pb2_grpc
from wicore.worker.costs import EXPLORE_EVERY, CostMeter
from wicore.worker.offload import KvOffloader, OffloadStats, Reload

from tier_process import TierProcess, kv_of, new_hash, put, running_tier

BLOCK_TOKENS = 16


@pytest.fixture(scope="module")
async def tier(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> AsyncIterator[TierProcess]:
    async with running_tier(tmp_path_factory.mktemp("tier"), redis_url) as running:
        yield running


async def stored_chain(tier: TierProcess, n: int) -> list[BlockHash]:
    chain = [new_hash() for _ in range(n)]
    async with grpc.aio.insecure_channel(tier.address, options=CHANNEL_OPTIONS) as channel:
        reply = await put(tier_pb2_grpc.TierStub(channel), *chain)
    assert reply.stored == n
    return chain


async def load(
    tier: TierProcess, costs: CostMeter, chain: list[BlockHash], measured: bool = True
) -> tuple[Reload, OffloadStats]:
    """One request's `KvOffloader.load` of `chain`, with `costs` as the engine measured them."""
    client = TierClient(tier.address)
    offloader = KvOffloader(client, Codec.RAW, block_size=BLOCK_TOKENS, costs=costs, measured_loads=measured)
    try:
        return await offloader.load(chain), offloader.stats
    finally:
        await client.close()


async def test_loads_are_timed_and_a_slow_tier_is_not_loaded_from(tier: TierProcess) -> None:
    costs = CostMeter()
    chain = await stored_chain(tier, 4)
    reload, stats = await load(tier, costs, chain)  # prefill not measured yet: load, and time it
    assert [torch.equal(kv, kv_of(h)) for kv, h in zip(reload.kv, chain, strict=True)] == [True] * 4
    measured = costs.load_seconds()[StorageTier.CPU]
    assert measured > 0.0 and stats.declined == 0

    # Recomputing a block measured at a tenth of its load time: every block is recomputed.
    costs.prefill_s_per_token.value = measured / 10 / BLOCK_TOKENS
    reload, stats = await load(tier, costs, chain)
    assert reload.kv == [] and stats.declined == 4 and stats.loaded[StorageTier.CPU] == 0

    # worker.tier_loads: always loads them anyway.
    reload, stats = await load(tier, costs, chain, measured=False)
    assert len(reload.kv) == 4 and stats.declined == 0


async def test_a_tier_faster_than_recomputing_is_loaded_from(tier: TierProcess) -> None:
    costs = CostMeter()
    chain = await stored_chain(tier, 4)
    await load(tier, costs, chain)
    measured = costs.load_seconds()[StorageTier.CPU]
    costs.prefill_s_per_token.value = 10 * measured / BLOCK_TOKENS  # recomputing: 10x the load
    reload, stats = await load(tier, costs, chain)
    assert len(reload.kv) == 4 and stats.declined == 0 and stats.loaded[StorageTier.CPU] == 4


async def test_a_declined_tier_is_measured_again_every_explore_every_runs(tier: TierProcess) -> None:
    """One slow sample must not turn a tier off for good: every EXPLORE_EVERY-th run that would be
    declined is loaded (and timed) anyway."""
    costs = CostMeter()
    chain = await stored_chain(tier, 2)
    client = TierClient(tier.address)
    offloader = KvOffloader(client, Codec.RAW, block_size=BLOCK_TOKENS, costs=costs)
    try:
        costs.load_s_per_block[StorageTier.CPU].value = 10.0  # one pathological sample: 10 s a block
        costs.prefill_s_per_token.value = 0.001  # 16 ms a block to recompute
        loaded = [len((await offloader.load(chain)).kv) for _ in range(EXPLORE_EVERY)]
    finally:
        await client.close()
    assert loaded == [0] * (EXPLORE_EVERY - 1) + [2]
    assert offloader.stats.declined == 2 * (EXPLORE_EVERY - 1)
    assert costs.load_seconds()[StorageTier.CPU] < 10.0  # the real load time pulled it down
