"""The tier service as a real process, over real gRPC on loopback, with a real Redis."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest
import redis

from wicore.kv.hashing import payload_checksum
from wicore.redis_keys import block_key, block_pattern, score_key
from wicore.server import CHANNEL_OPTIONS
from wicore.v1 import tier_pb2, tier_pb2_grpc

from tier_process import (
    BLOCK_BYTES,
    BLOCK_SHAPE,
    CAPACITY,
    TierProcess,
    assert_q4_close,
    block_chunks,
    delete_namespace,
    free_port,
    get,
    kv_of,
    new_hash,
    put,
    raw_of,
    start_tier,
    stop,
    wait_up,
)


@pytest.fixture(scope="module")
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture(scope="module")
async def tier(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, redis_client: redis.Redis
) -> AsyncIterator[TierProcess]:
    # every NVMe hit promoted: these tests check the mechanics (test_tier_manager.py the admission)
    running = start_tier(
        tmp_path_factory.mktemp("tier"),
        redis_url,
        f"wicore-test-{uuid.uuid4().hex}",
        a2cr={"promotion_admission": False},
    )
    try:
        await wait_up(running)
        yield running
    finally:
        stop(running)
        delete_namespace(redis_client, running.namespace)


@pytest.fixture(scope="module")
async def stub(tier: TierProcess) -> AsyncIterator[tier_pb2_grpc.TierStub]:
    async with grpc.aio.insecure_channel(tier.address, options=CHANNEL_OPTIONS) as channel:
        yield tier_pb2_grpc.TierStub(channel)


async def test_put_get_round_trip_is_byte_identical(
    stub: tier_pb2_grpc.TierStub, tier: TierProcess, redis_client: redis.Redis
) -> None:
    a, b = new_hash(), new_hash()
    reply = await put(stub, a, b)
    assert reply.stored == 2 and reply.evicted == 0
    got = await get(stub, [b, new_hash(), a])  # the absent one is skipped
    assert got == {a: (raw_of(a), tier_pb2.STORAGE_TIER_CPU), b: (raw_of(b), tier_pb2.STORAGE_TIER_CPU)}

    fields = redis_client.hgetall(block_key(tier.namespace, "local", a))
    assert fields["tier"] == "cpu" and fields["codec"] == "raw" and fields["nvme_copy"] == "0"
    assert int(fields["bytes"]) == BLOCK_BYTES and int(fields["hits"]) == 2  # the put and the get
    assert float(fields["last_access"]) >= float(fields["created"]) > 0
    assert redis_client.zscore(score_key(tier.namespace, "local", "cpu"), a) is not None


async def test_overflow_demotes_to_nvme_as_q4_and_a_get_promotes(
    stub: tier_pb2_grpc.TierStub, tier: TierProcess, redis_client: redis.Redis
) -> None:
    hashes = [new_hash() for _ in range(40)]  # 10 MiB raw into an 8 MiB CPU tier
    reply = await put(stub, *hashes)
    assert reply.stored == 40 and reply.evicted == 0  # demoted, not lost
    lookup = await stub.Lookup(tier_pb2.LookupRequest(block_hashes=hashes), timeout=10)
    assert lookup.prefix_blocks == 40
    assert tier_pb2.STORAGE_TIER_NVME in lookup.tiers and lookup.tiers[-1] == tier_pb2.STORAGE_TIER_CPU
    first_on_nvme = hashes[list(lookup.tiers).index(tier_pb2.STORAGE_TIER_NVME)]

    fields = redis_client.hgetall(block_key(tier.namespace, "local", first_on_nvme))
    assert fields["tier"] == "nvme" and fields["codec"] == "q4"
    assert redis_client.zscore(score_key(tier.namespace, "local", "nvme"), first_on_nvme) is not None
    assert redis_client.zscore(score_key(tier.namespace, "local", "cpu"), first_on_nvme) is None

    ((block, source),) = (await get(stub, [first_on_nvme])).values()
    assert source == tier_pb2.STORAGE_TIER_NVME
    assert_q4_close(block, kv_of(first_on_nvme))
    lookup = await stub.Lookup(tier_pb2.LookupRequest(block_hashes=[first_on_nvme]), timeout=10)
    assert list(lookup.tiers) == [tier_pb2.STORAGE_TIER_CPU]  # promoted (as its q4 bytes)
    ((again, source),) = (await get(stub, [first_on_nvme])).values()
    assert again == block and source == tier_pb2.STORAGE_TIER_CPU

    stats = await stub.Stats(tier_pb2.StatsRequest(), timeout=10)
    cpu, nvme = stats.tiers
    assert stats.redis_ok and stats.policy == "a2cr"
    assert (
        cpu.tier == tier_pb2.STORAGE_TIER_CPU
        and cpu.codec == tier_pb2.CODEC_RAW
        and cpu.capacity_bytes == CAPACITY
    )
    assert nvme.tier == tier_pb2.STORAGE_TIER_NVME and nvme.codec == tier_pb2.CODEC_Q4 and nvme.blocks >= 8
    assert cpu.used_bytes <= CAPACITY and 0 < cpu.pressure <= 1 and cpu.eviction_threshold > 0
    assert stats.blocks_demoted >= 8 and stats.blocks_promoted >= 1 and stats.bytes_demoted > 0


async def test_block_larger_than_capacity_is_resource_exhausted(stub: tier_pb2_grpc.TierStub) -> None:
    big = new_hash()
    layer_bytes = BLOCK_BYTES // BLOCK_SHAPE[0]
    block = raw_of(big, layers=CAPACITY // layer_bytes + 8)  # 8.25 MiB: under max_block_bytes, over CPU
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.PutBlocks(iter(block_chunks(big, block)), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "exceed the CPU tier's capacity" in (info.value.details() or "")


async def test_lookup_gives_longest_present_prefix(stub: tier_pb2_grpc.TierStub) -> None:
    a, b, c, missing = (new_hash() for _ in range(4))
    await put(stub, a, b, c)
    reply = await stub.Lookup(tier_pb2.LookupRequest(block_hashes=[a, b, missing, c]), timeout=10)
    assert reply.prefix_blocks == 2
    assert list(reply.tiers) == [tier_pb2.STORAGE_TIER_CPU] * 2
    reply = await stub.Lookup(tier_pb2.LookupRequest(block_hashes=[missing, a]), timeout=10)
    assert reply.prefix_blocks == 0 and list(reply.tiers) == []


async def test_prefetch_update_scores_and_drop(
    stub: tier_pb2_grpc.TierStub, tier: TierProcess, redis_client: redis.Redis
) -> None:
    a, b, missing = new_hash(), new_hash(), new_hash()
    await put(stub, a, b)
    reply = await stub.UpdateScores(
        tier_pb2.UpdateScoresRequest(
            observations=[
                tier_pb2.AttentionObservation(block_hash=a, mass=0.9, blocks_in_sequence=10),
                tier_pb2.AttentionObservation(block_hash=missing, mass=0.1, blocks_in_sequence=10),
            ]
        ),
        timeout=10,
    )
    assert (reply.updated, reply.unknown) == (1, 1)
    assert float(redis_client.hget(block_key(tier.namespace, "local", a), "attention") or 0) > 0.6
    prefetch = await stub.Prefetch(tier_pb2.PrefetchRequest(block_hashes=[a, missing]), timeout=10)
    assert (prefetch.promoted, prefetch.already_cpu, prefetch.missing) == (0, 1, 1)
    dropped = await stub.Drop(tier_pb2.DropRequest(block_hashes=[a, missing]), timeout=10)
    assert dropped.dropped == 1
    assert await get(stub, [a, b]) == {b: (raw_of(b), tier_pb2.STORAGE_TIER_CPU)}
    assert redis_client.exists(block_key(tier.namespace, "local", a)) == 0


@pytest.mark.parametrize(
    ("observation", "field"),
    [
        (tier_pb2.AttentionObservation(block_hash="../x", mass=0.5, blocks_in_sequence=1), "block_hash"),
        (tier_pb2.AttentionObservation(block_hash="0" * 32, mass=1.5, blocks_in_sequence=1), "mass"),
        (tier_pb2.AttentionObservation(block_hash="0" * 32, mass=float("nan"), blocks_in_sequence=1), "mass"),
        (
            tier_pb2.AttentionObservation(block_hash="0" * 32, mass=0.5, blocks_in_sequence=0),
            "blocks_in_sequence",
        ),
    ],
)
async def test_bad_observation_names_the_field(
    stub: tier_pb2_grpc.TierStub, observation: tier_pb2.AttentionObservation, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.UpdateScores(tier_pb2.UpdateScoresRequest(observations=[observation]), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith(f"observations[0].{field}:")


async def test_checksum_mismatch_is_invalid_argument(stub: tier_pb2_grpc.TierStub) -> None:
    block_hash = new_hash()
    chunks = block_chunks(block_hash, raw_of(block_hash), checksum=payload_checksum(b"x"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.PutBlocks(iter(chunks), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "header.checksum" in (info.value.details() or "")
    assert await get(stub, [block_hash]) == {}


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda c: setattr(c[0], "block_hash", "../../etc/passwd"), "block_hash"),
        (lambda c: setattr(c[0].header, "block_hash", "ABC"), "header.block_hash"),
        (lambda c: c[0].ClearField("header"), "header"),
        (lambda c: setattr(c[1], "offset", 7), "offset"),
        (lambda c: c.pop(), "data"),
        (lambda c: setattr(c[0].header, "payload_bytes", 1 << 40), "header.payload_bytes"),
        (lambda c: setattr(c[0].header, "codec", tier_pb2.CODEC_UNSPECIFIED), "header.codec"),
        (lambda c: setattr(c[0].header, "dtype", "int64"), "header.dtype"),
        (lambda c: c[0].header.shape.pop(), "header.shape"),
        (lambda c: setattr(c[0].header, "sink_tokens", 17), "header.sink_tokens"),
        (lambda c: setattr(c[0].header, "lz4", True), "header.payload_bytes"),
    ],
)
async def test_malformed_put_names_the_field(
    stub: tier_pb2_grpc.TierStub, mutate: Callable[[list[tier_pb2.BlockChunk]], object], field: str
) -> None:
    block_hash = new_hash()
    chunks = block_chunks(block_hash, raw_of(block_hash))
    mutate(chunks)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.PutBlocks(iter(chunks), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith(f"{field}:")


async def test_malformed_hash_in_get_and_lookup(stub: tier_pb2_grpc.TierStub) -> None:
    bad = [new_hash(), "not-a-hash"]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await get(stub, bad)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith("block_hashes[1]:")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Lookup(tier_pb2.LookupRequest(block_hashes=bad), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith("block_hashes[1]:")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Lookup(tier_pb2.LookupRequest(block_hashes=[new_hash()] * 4097), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_sigterm_exits_zero_and_keeps_only_nvme_blocks(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    running = start_tier(
        tmp_path, redis_url, f"wicore-test-{uuid.uuid4().hex}", cpu_capacity_bytes=BLOCK_BYTES
    )
    try:
        await wait_up(running)
        first, second = new_hash(), new_hash()
        async with grpc.aio.insecure_channel(running.address, options=CHANNEL_OPTIONS) as channel:
            assert (await put(tier_pb2_grpc.TierStub(channel), first, second)).stored == 2  # first demoted
        assert redis_client.exists(block_key(running.namespace, "local", second)) == 1
        started = time.monotonic()
        running.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(running.proc.wait, 10) == 0
        assert time.monotonic() - started < 5
        # The CPU copy died with the process; the NVMe one is still described.
        keys = redis_client.scan_iter(match=block_pattern(running.namespace, "local"))
        blocks = {k.split(":blk:")[1] for k in keys}
        assert blocks == {first}
    finally:
        stop(running)
        delete_namespace(redis_client, running.namespace)


async def test_serves_without_redis(tmp_path: Path) -> None:
    dead_url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    running = start_tier(tmp_path, dead_url, "wicore-test-unused")
    try:
        await wait_up(running)
        async with grpc.aio.insecure_channel(running.address, options=CHANNEL_OPTIONS) as channel:
            stub = tier_pb2_grpc.TierStub(channel)
            block_hash = new_hash()
            assert (await put(stub, block_hash)).stored == 1
            assert await get(stub, [block_hash]) == {
                block_hash: (raw_of(block_hash), tier_pb2.STORAGE_TIER_CPU)
            }
            stats = await stub.Stats(tier_pb2.StatsRequest(), timeout=10)
            assert not stats.redis_ok
            assert stats.tiers[0].blocks == 1
        running.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(running.proc.wait, 10) == 0
    finally:
        stop(running)


async def test_attention_observations_change_the_eviction_order(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    """With the performance guide's weights (attention 0.4, the default is 0): a is older than b,
    so without attention a would be demoted first; a worker reports that a takes most of its
    sequence's attention and b none, and b goes instead."""
    namespace = f"wicore-test-{uuid.uuid4().hex}"
    guide = {"attention_weight": 0.4, "frequency_weight": 0.3, "recency_weight": 0.3}
    running = start_tier(tmp_path, redis_url, namespace, a2cr=guide, cpu_capacity_bytes=3 * BLOCK_BYTES)
    try:
        await wait_up(running)
        a, b, c, d = (new_hash() for _ in range(4))
        async with grpc.aio.insecure_channel(running.address, options=CHANNEL_OPTIONS) as channel:
            stub = tier_pb2_grpc.TierStub(channel)
            await put(stub, a)
            await put(stub, b)
            observations = [
                tier_pb2.AttentionObservation(block_hash=a, mass=0.9, blocks_in_sequence=8),
                tier_pb2.AttentionObservation(block_hash=b, mass=0.0, blocks_in_sequence=8),
            ]
            for _ in range(3):
                await stub.UpdateScores(tier_pb2.UpdateScoresRequest(observations=observations), timeout=10)
            key = score_key(namespace, "local", "cpu")
            assert (redis_client.zscore(key, a) or 0) > (redis_client.zscore(key, b) or 0)
            await put(stub, c)
            await put(stub, d)  # 4 blocks into 3: the two lowest scores go to NVMe, b first
            tiers = {}
            for h in (a, b, c, d):
                lookup = await stub.Lookup(tier_pb2.LookupRequest(block_hashes=[h]), timeout=10)
                tiers[h] = list(lookup.tiers)
            assert tiers[a] == [tier_pb2.STORAGE_TIER_CPU] and tiers[b] == [tier_pb2.STORAGE_TIER_NVME]
            assert tiers[d] == [tier_pb2.STORAGE_TIER_CPU]
        assert redis_client.hget(block_key(namespace, "local", b), "tier") == "nvme"
    finally:
        stop(running)
        delete_namespace(redis_client, namespace)
