"""The tier service under faults, as a real process with real files and a real Redis:
kill -9 while writing, a corrupted block file, Redis flushed, stopped and restarted.

Blocks are derived from their hash (`raw_of`), and these tiers store "raw" on both
levels, so every block served can be checked byte for byte.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from wicore.kv.hashing import BlockHash
from wicore.redis_keys import block_pattern, score_key
from wicore.redis_server import start_private_redis
from wicore.server import CHANNEL_OPTIONS
from wicore.v1 import tier_pb2, tier_pb2_grpc

from stack import until
from tier_process import (
    BLOCK_SHAPE,
    TierProcess,
    block_chunks,
    delete_namespace,
    get,
    new_hash,
    raw_of,
    start_tier,
    stop,
    wait_up,
)

LAYER_BYTES = 2 * 16 * 4 * 64 * 4
KILLS = 3


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def raw_tier(tmp: Path, redis_url: str, namespace: str, cpu_blocks: int) -> TierProcess:
    return start_tier(
        tmp,
        redis_url,
        namespace,
        cpu_capacity_bytes=cpu_blocks * LAYER_BYTES * BLOCK_SHAPE[0],
        cpu_codec="raw",
        nvme_codec="raw",
        nvme_capacity_bytes=1 << 30,
    )


def described(client: redis.Redis, namespace: str) -> dict[str, dict[str, str]]:
    return {
        key.split(":blk:")[1]: client.hgetall(key)
        for key in client.scan_iter(match=block_pattern(namespace, "local"))
    }


async def verify_everything(address: str, sent: list[BlockHash]) -> set[str]:
    """Every block the tier serves is exactly the one sent; returns the hashes it holds."""
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = tier_pb2_grpc.TierStub(channel)
        held: set[str] = set()
        for start in range(0, len(sent), 64):
            batch = sent[start : start + 64]
            for block_hash, (block, _) in (await get(stub, batch)).items():
                assert block == raw_of(block_hash), f"block {block_hash} served with other bytes"
                held.add(block_hash)
        return held


async def test_kill_9_while_writing_then_restart_serves_only_intact_blocks(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    namespace = f"wicore-test-{uuid.uuid4().hex}"
    rng = random.Random()
    sent: list[BlockHash] = []
    acknowledged: list[BlockHash] = []  # of the current run

    async def writer(stub: tier_pb2_grpc.TierStub) -> None:
        while True:
            block_hash = new_hash()
            sent.append(block_hash)
            reply = await stub.PutBlocks(iter(block_chunks_of(block_hash)), timeout=30)
            assert reply.stored == 1 and reply.evicted == 0
            acknowledged.append(block_hash)

    tier = None
    try:
        for kill in range(KILLS + 1):
            # A 4-block CPU tier: nearly every put demotes a block, so NVMe writes are always in flight.
            tier = raw_tier(tmp_path, redis_url, namespace, cpu_blocks=4)
            await wait_up(tier)
            held = await verify_everything(tier.address, sent)
            on_disk = {p.name.removesuffix(".blk") for p in tier.nvme_dir.rglob("*.blk")}
            assert held == on_disk and not list(tier.nvme_dir.rglob("*.tmp-*"))
            # Every acknowledged block was demoted (written, fsynced) unless it was one of the 4 in RAM.
            assert len(set(acknowledged) - held) <= 4, f"run {kill}: acknowledged blocks lost"
            # Redis after recovery describes exactly the NVMe blocks (the CPU copies died).
            assert set(described(redis_client, namespace)) == held
            if kill == KILLS:
                break
            acknowledged.clear()
            async with grpc.aio.insecure_channel(tier.address, options=CHANNEL_OPTIONS) as channel:
                task = asyncio.create_task(writer(tier_pb2_grpc.TierStub(channel)))
                await asyncio.sleep(rng.uniform(0.6, 1.5))  # long enough for > 4 blocks on a slow disk
                tier.proc.send_signal(signal.SIGKILL)
                await asyncio.to_thread(tier.proc.wait, 10)
                with pytest.raises(grpc.aio.AioRpcError):
                    await asyncio.wait_for(task, 10)
            assert len(acknowledged) > 4, "the writer got too few blocks through to test anything"
        assert tier is not None
        stats = await stats_of(tier)
        assert stats.corrupt_blocks == 0  # a crash never leaves an invalid file under a final name
        assert stats.tiers[1].evictions == 0  # so every loss above would have been a bug
    finally:
        if tier is not None:
            stop(tier)
        delete_namespace(redis_client, namespace)


def block_chunks_of(block_hash: str) -> list[tier_pb2.BlockChunk]:
    return block_chunks(block_hash, raw_of(block_hash))


async def stats_of(tier: TierProcess) -> tier_pb2.StatsResponse:
    async with grpc.aio.insecure_channel(tier.address, options=CHANNEL_OPTIONS) as channel:
        return await tier_pb2_grpc.TierStub(channel).Stats(tier_pb2.StatsRequest(), timeout=10)


async def test_corrupt_block_file_is_deleted_and_never_served(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    namespace = f"wicore-test-{uuid.uuid4().hex}"
    tier = start_tier(tmp_path, redis_url, namespace, cpu_capacity_bytes=0, nvme_codec="raw")
    try:
        await wait_up(tier)
        a, b = new_hash(), new_hash()
        async with grpc.aio.insecure_channel(tier.address, options=CHANNEL_OPTIONS) as channel:
            stub = tier_pb2_grpc.TierStub(channel)
            assert (
                await stub.PutBlocks(iter(block_chunks_of(a) + block_chunks_of(b)), timeout=30)
            ).stored == 2
            path = tier.nvme_dir / a[:2] / f"{a}.blk"
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x01  # one bit, in the payload
            path.write_bytes(bytes(data))
            got = await get(stub, [a, b])
            assert set(got) == {b} and got[b][0] == raw_of(b)
            stats = await stub.Stats(tier_pb2.StatsRequest(), timeout=10)
            assert stats.corrupt_blocks == 1 and stats.tiers[0].blocks == 1
            assert not path.exists()
            lookup = await stub.Lookup(tier_pb2.LookupRequest(block_hashes=[a]), timeout=10)
            assert lookup.prefix_blocks == 0
        assert set(described(redis_client, namespace)) == {b}
    finally:
        stop(tier)
        delete_namespace(redis_client, namespace)


async def test_redis_flushed_while_running_is_rewritten(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    namespace = f"wicore-test-{uuid.uuid4().hex}"
    tier = raw_tier(tmp_path, redis_url, namespace, cpu_blocks=2)
    try:
        await wait_up(tier)
        hashes = [new_hash() for _ in range(4)]
        async with grpc.aio.insecure_channel(tier.address, options=CHANNEL_OPTIONS) as channel:
            stub = tier_pb2_grpc.TierStub(channel)
            chunks = [c for h in hashes for c in block_chunks_of(h)]
            assert (await stub.PutBlocks(iter(chunks), timeout=30)).stored == 4
            assert set(described(redis_client, namespace)) == set(hashes)
            delete_namespace(redis_client, namespace)  # FLUSHALL, but only of this test's keys
            await until(
                lambda: set(described(redis_client, namespace)) == set(hashes), "the keys to come back"
            )
            names = {tier_pb2.STORAGE_TIER_CPU: "cpu", tier_pb2.STORAGE_TIER_NVME: "nvme"}
            for block_hash, fields in described(redis_client, namespace).items():
                lookup = await stub.Lookup(tier_pb2.LookupRequest(block_hashes=[block_hash]), timeout=10)
                assert fields["tier"] == names[lookup.tiers[0]]
        cpu_scores = redis_client.zcard(score_key(namespace, "local", "cpu"))
        assert 1 <= cpu_scores <= 2 and redis_client.zcard(score_key(namespace, "local", "nvme")) >= 2
    finally:
        stop(tier)
        delete_namespace(redis_client, namespace)


async def test_redis_stopped_then_restarted_empty(tmp_path: Path) -> None:
    redis_dir = tmp_path / "redis-state"
    proc, url = start_private_redis(redis_dir)
    client = redis.Redis.from_url(url, decode_responses=True)
    namespace = "wicore-test"
    tier = raw_tier(tmp_path, url, namespace, cpu_blocks=2)
    try:
        await wait_up(tier)
        first, second = new_hash(), new_hash()
        async with grpc.aio.insecure_channel(tier.address, options=CHANNEL_OPTIONS) as channel:
            stub = tier_pb2_grpc.TierStub(channel)
            await stub.PutBlocks(iter(block_chunks_of(first)), timeout=30)
            assert set(described(client, namespace)) == {first}

            proc.terminate()
            proc.wait(timeout=10)
            started = time.monotonic()
            assert (await stub.PutBlocks(iter(block_chunks_of(second)), timeout=30)).stored == 1
            got = await get(stub, [first, second])
            assert set(got) == {first, second}  # serving goes on from what it holds
            assert time.monotonic() - started < 5
            assert not (await stub.Stats(tier_pb2.StatsRequest(), timeout=10)).redis_ok  # degraded

            shutil.rmtree(redis_dir / "redis")  # it comes back without its data
            proc, url = start_private_redis(redis_dir)
            client = redis.Redis.from_url(url, decode_responses=True)
            await until(lambda: set(described(client, namespace)) == {first, second}, "the tier to catch up")
            assert (await stub.Stats(tier_pb2.StatsRequest(), timeout=10)).redis_ok
    finally:
        stop(tier)
        client.close()
        proc.terminate()
        proc.wait(timeout=10)


async def test_restart_rebuilds_metadata_from_file_headers(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    namespace = f"wicore-test-{uuid.uuid4().hex}"
    tier = start_tier(tmp_path, redis_url, namespace, cpu_capacity_bytes=0, nvme_codec="q4")
    try:
        await wait_up(tier)
        hashes = [new_hash() for _ in range(3)]
        async with grpc.aio.insecure_channel(tier.address, options=CHANNEL_OPTIONS) as channel:
            chunks = [c for h in hashes for c in block_chunks_of(h)]
            assert (await tier_pb2_grpc.TierStub(channel).PutBlocks(iter(chunks), timeout=30)).stored == 3
        want = described(redis_client, namespace)
        tier.proc.send_signal(signal.SIGKILL)
        tier.proc.wait(timeout=10)
        delete_namespace(redis_client, namespace)  # Redis restarted without persistence

        tier = start_tier(tmp_path, redis_url, namespace, cpu_capacity_bytes=0, nvme_codec="q4")
        await wait_up(tier)
        got = described(redis_client, namespace)
        assert set(got) == set(hashes)
        for block_hash in hashes:
            for field in ("tier", "codec", "bytes", "created"):
                assert got[block_hash][field] == want[block_hash][field], field
    finally:
        stop(tier)
        delete_namespace(redis_client, namespace)
