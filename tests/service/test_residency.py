"""Residency in a real Redis: the worker's publisher and the scheduler's lookups,
and what happens when Redis does not answer."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import redis.asyncio as aioredis
from transformers import AutoTokenizer

from wicore.config import RedisConfig
from wicore.kv.block import StorageTier
from wicore.kv.hashing import BlockHash, chain_hashes, root_hash
from wicore.redis_keys import block_key
from wicore.redis_server import MAX_CONNECTIONS
from wicore.scheduler.prefix_index import PrefixIndex
from wicore.scheduler.registry import WorkerInfo
from wicore.worker.residency import ResidencyPublisher

DEAD_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1


def h(i: int) -> BlockHash:
    return BlockHash(f"{i:032x}")


async def test_publisher_sends_diffs_and_a_restart_rewrites_the_set(redis_url: str) -> None:
    ns = f"wicore-test-{uuid.uuid4().hex[:8]}"
    client = aioredis.from_url(redis_url)
    key = f"{ns}:res:w1"
    try:
        await client.sadd(key, h(99))  # left over from the worker's previous life
        publisher = ResidencyPublisher(RedisConfig(redis_url, ns), "w1", ttl_s=30)
        await publisher.publish(frozenset({h(1), h(2)}))
        assert await client.smembers(key) == {h(1).encode(), h(2).encode()}
        assert 0 < await client.ttl(key) <= 30
        await publisher.publish(frozenset({h(2), h(3)}))
        assert await client.smembers(key) == {h(2).encode(), h(3).encode()}
        await publisher.publish(frozenset())
        assert await client.exists(key) == 0  # an empty set is no key at all
        await publisher.publish(frozenset({h(4)}))
        await publisher.clear()
        assert await client.exists(key) == 0
        await publisher.close()
    finally:
        await client.delete(key)
        await client.aclose()


async def test_lookup_counts_each_workers_resident_prefix_and_reads_tiers(redis_url: str) -> None:
    ns = f"wicore-test-{uuid.uuid4().hex[:8]}"
    client = aioredis.from_url(redis_url)
    index = PrefixIndex(RedisConfig(redis_url, ns), timeout_s=0.5)
    try:
        await client.sadd(f"{ns}:res:a", h(0), h(1), h(2))
        await client.sadd(f"{ns}:res:b", h(0), h(2))  # h(1) missing: its prefix is 1 block
        await client.hset(block_key(ns, "n1", h(0)), mapping={"tier": "cpu", "bytes": 1})
        await client.hset(block_key(ns, "n1", h(1)), mapping={"tier": "nvme"})
        await client.hset(block_key(ns, "n1", h(2)), mapping={"tier": "tape"})  # unknown: not usable
        await client.hset(block_key(ns, "n2", h(0)), mapping={"tier": "nvme"})  # another node's tier
        device, tiers = await index.lookup(["a", "b", "c"], ["n1", "n2", "n3"], [h(0), h(1), h(2), h(3)])
        assert device == {"a": 3, "b": 1, "c": 0}
        assert tiers == {
            "n1": (StorageTier.CPU, StorageTier.NVME, None, None),
            "n2": (StorageTier.NVME, None, None, None),
            "n3": (None, None, None, None),
        }
    finally:
        keys = [block_key(ns, n, h(i)) for n in ("n1", "n2") for i in range(3)]
        await client.delete(*[f"{ns}:res:{w}" for w in "ab"], *keys)
        await client.aclose()
        await index.close()


async def test_describe_hashes_prompts_as_the_worker_does(tiny_llama_dir: Path, redis_url: str) -> None:
    index = PrefixIndex(RedisConfig(redis_url, f"wicore-test-{uuid.uuid4().hex[:8]}"), timeout_s=0.5)
    w = WorkerInfo("w", "w:1", "cpu", "m", 4096, 100, 16, 8, fingerprint="fp")
    ids = AutoTokenizer.from_pretrained(tiny_llama_dir).encode(
        "Paged attention keeps the KV cache in fixed-size blocks. " * 4
    )
    try:
        prefix = await index.describe(ids, "salt", [w])
    finally:
        await index.close()
    usable = (len(ids) - 1) // 16
    assert usable >= 2
    assert prefix.hashes == tuple(chain_hashes(root_hash("fp", "salt"), ids[: usable * 16], 16))
    assert (prefix.fingerprint, prefix.block_size, dict(prefix.device)) == ("fp", 16, {"w": 0})


async def test_redis_down_means_no_information_fast_and_no_error() -> None:
    index = PrefixIndex(RedisConfig(DEAD_REDIS, "x"), timeout_s=0.2, retry_after_s=60.0)
    started = time.monotonic()
    try:
        assert await index.lookup(["a"], ["n"], [h(0)]) == ({}, {})
        assert await index.lookup(["a"], ["n"], [h(0)]) == ({}, {})  # not even tried: Redis is resting
    finally:
        await index.close()
    assert time.monotonic() - started < 1.0
    publisher = ResidencyPublisher(RedisConfig(DEAD_REDIS, "x"), "w", ttl_s=10, timeout_s=0.2)
    await publisher.publish(frozenset({h(1)}))  # logged, not raised
    await publisher.clear()
    await publisher.close()


async def test_a_burst_of_lookups_shares_a_bounded_pool(redis_url: str) -> None:
    """64 lookups at once through a pool of MAX_CONNECTIONS: each waits for a connection, none
    fails, and the process never holds more sockets than the bound (the stress test's fd check)."""
    index = PrefixIndex(RedisConfig(redis_url, f"wicore-test-{uuid.uuid4().hex[:8]}"), timeout_s=2.0)
    pool = index._redis.connection_pool
    try:
        replies = await asyncio.gather(*(index.lookup(["a"], ["n"], [h(i)]) for i in range(64)))
        assert all(device == {"a": 0} for device, _ in replies)
        assert index.failures == 0
        assert pool.max_connections == MAX_CONNECTIONS
        assert len(pool._available_connections) + len(pool._in_use_connections) <= MAX_CONNECTIONS
    finally:
        await index.close()
