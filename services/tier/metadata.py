"""Block metadata mirrored to Redis, so the scheduler and workers can see what the tier holds.

Keys (DESIGN.md §5), `ns` being `config.redis.namespace`:

    {ns}:blk:{hash}   hash: tier, bytes, codec, dtype, created, last_access, hits
    {ns}:a2cr:cpu     sorted set, member = block hash, score = last access time

The score is the last access time (LRU) for now; the A²CR score (DESIGN.md §4)
and the `attention` field come in a later issue. Each RPC makes at most one round
trip: one MULTI/EXEC pipeline. Redis is advisory: when it is unreachable the
mirror logs once, reports `redis_ok = False`, skips writes for `retry_after_s` and
recovers on the next write that succeeds. Updates missed while degraded are not
replayed (a block's keys are rewritten whole on its next put or get; resyncing
the rest, stale keys of evicted blocks included, is a later issue).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from wicore.hashing import BlockHash
from wicore.tier.store import CpuTier, StorageTier, StoredBlock

log = logging.getLogger(__name__)

# Unreachable (ConnectionError, TimeoutError) or refusing (OOM, READONLY...): serve on regardless.
REDIS_DOWN = (RedisError, OSError)
DELETE_BATCH = 1000  # keys per DEL command when forgetting many blocks


def connect_redis(url: str, timeout_s: float = 0.5) -> aioredis.Redis:
    """A client that fails fast (no retries, short timeouts) so a dead Redis never stalls RPCs."""
    return aioredis.from_url(
        url,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


class BlockMetadata:
    """Writes the tier's block state to Redis; owns the `redis_ok` flag.

    Writes are serialised by a lock and read the tier's state inside it, so the
    last write to reach Redis reflects the latest state of every block it names.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        namespace: str,
        tier: StorageTier = StorageTier.CPU,
        retry_after_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = client
        self._ns = namespace
        self._tier = tier
        self._retry_after_s = retry_after_s
        self._clock = clock
        self._lock = asyncio.Lock()
        self._ok = True
        self._retry_at = 0.0

    @property
    def redis_ok(self) -> bool:
        return self._ok

    def block_key(self, block_hash: BlockHash) -> str:
        return f"{self._ns}:blk:{block_hash}"

    @property
    def score_key(self) -> str:
        return f"{self._ns}:a2cr:{self._tier.value}"

    async def sync(self, store: CpuTier, touched: Iterable[BlockHash], evicted: Iterable[BlockHash]) -> None:
        """Writes the current state of the named blocks: present ones whole, absent ones deleted."""
        async with self._lock:
            if not self._should_try():  # checked under the lock: waiters skip a Redis just found down
                return
            present: list[StoredBlock] = []
            for block_hash in dict.fromkeys(touched):
                block = store.peek(block_hash)
                if block is not None:
                    present.append(block)
            gone = [h for h in dict.fromkeys(evicted) if not store.contains(h)]
            await self._write(present, gone)

    async def forget(self, hashes: Iterable[BlockHash]) -> None:
        """Deletes the keys of these blocks (the tier is going away with them)."""
        async with self._lock:
            await self._write([], list(hashes))

    async def ping(self) -> bool:
        """Checks Redis now (whatever the retry timer says); returns and records `redis_ok`."""
        await self._run(self._redis.ping)
        return self._ok

    async def _write(self, present: list[StoredBlock], gone: list[BlockHash]) -> None:
        if present or gone:
            await self._run(lambda: self._execute(present, gone))

    async def _execute(self, present: list[StoredBlock], gone: list[BlockHash]) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            for start in range(0, len(gone), DELETE_BATCH):
                batch = gone[start : start + DELETE_BATCH]
                pipe.delete(*(self.block_key(h) for h in batch))
                pipe.zrem(self.score_key, *batch)
            for block in present:
                pipe.hset(self.block_key(block.block_hash), mapping=self._fields(block))
            if present:
                pipe.zadd(self.score_key, {b.block_hash: b.last_access for b in present})
            await pipe.execute()

    def _fields(self, block: StoredBlock) -> dict[FieldT, EncodableT]:
        return {
            "tier": self._tier.value,
            "bytes": block.nbytes,
            "codec": block.codec.value,
            "dtype": block.dtype,
            "created": block.created,
            "last_access": block.last_access,
            "hits": block.hits,
        }

    def _should_try(self) -> bool:
        return self._ok or self._clock() >= self._retry_at

    async def _run(self, call: Callable[[], Awaitable[Any]]) -> None:
        try:
            await call()
        except REDIS_DOWN as exc:
            if self._ok:
                log.warning("redis unreachable, serving without block metadata: %s", exc)
            self._ok = False
            self._retry_at = self._clock() + self._retry_after_s
            return
        if not self._ok:
            log.info("redis reachable again; block metadata resumes")
        self._ok = True
