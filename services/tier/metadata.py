"""Block metadata mirrored to Redis, so schedulers, workers and operators see what the tiers hold.

Keys (shared/redis_keys.py), `ns` being `config.redis.namespace` and `node` `config.tier.node`
(every key of one tier shares the `{node}` hash tag: one Redis Cluster slot):

    {ns}:tier:{node}:blk:{hash}    hash: tier ("cpu" | "nvme", the faster copy), nvme_copy (0|1),
                                   bytes, codec, created, last_access, hits, attention, observations
    {ns}:tier:{node}:a2cr:cpu      sorted set: member = block hash, score = the CPU policy's score
    {ns}:tier:{node}:a2cr:nvme     sorted set: the same for blocks with an NVMe copy
    {ns}:tier:{node}:epoch         sentinel: set by every full resync

Every write is one MULTI/EXEC pipeline, so a block's hash and its sorted-set
memberships change together (a move between tiers is atomic). The tier process
is the source of truth and Redis a mirror of it:

- a write that fails (Redis unreachable or refusing) sets `needs_resync`, the
  mirror reports `redis_ok = False` and skips Redis for `retry_after_s`;
- every write also checks the sentinel; if it is gone, Redis lost its data
  (flushed, or restarted without persistence) and `needs_resync` is set;
- a cleanup pass updates only the scores (`write_scores`);
- `resync` rewrites everything: both sorted sets from scratch, every block's
  hash, stale `blk` keys deleted (SCAN), and the sentinel.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.typing import EncodableT, FieldT

from wicore.kv.block import Codec, StorageTier
from wicore.kv.hashing import BlockHash
from wicore.redis_keys import block_key, block_pattern, score_key, tier_sentinel_key
from wicore.redis_server import REDIS_DOWN  # unreachable or refusing (OOM, READONLY...): serve on

log = logging.getLogger(__name__)

Scores = Mapping[StorageTier, Mapping[BlockHash, float]]  # per tier: block -> policy score

BATCH = 1000  # keys per command or pipeline when many blocks are written, read or deleted
SCORED_TIERS = (StorageTier.CPU, StorageTier.NVME)  # the tiers with a score set


@dataclass(frozen=True, slots=True)
class BlockRecord:
    """One block's state as Redis shows it."""

    block_hash: BlockHash
    tier: StorageTier
    nvme_copy: bool
    size_bytes: int
    codec: Codec
    created: float
    last_access: float
    hits: int
    attention: float
    observations: int  # attention samples behind `attention`
    scores: dict[StorageTier, float]  # one per tier holding a copy


# The changed blocks' records and the blocks gone, computed when Redis is written.
Changes = Callable[[], tuple[Sequence[BlockRecord], Sequence[BlockHash]]]


class BlockMetadata:
    """Writes block records to Redis; owns the `redis_ok` and `needs_resync` flags."""

    def __init__(
        self,
        client: aioredis.Redis | aioredis.RedisCluster,
        namespace: str,
        node: str = "local",
        retry_after_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = client
        self._ns = namespace
        self._node = node
        self._retry_after_s = retry_after_s
        self._clock = clock
        self._lock = asyncio.Lock()
        self._ok = True
        self._retry_at = 0.0
        self.needs_resync = True  # nothing written yet
        self.resyncs = 0

    @property
    def redis_ok(self) -> bool:
        return self._ok

    def block_key(self, block_hash: BlockHash) -> str:
        return block_key(self._ns, self._node, block_hash)

    def score_key(self, tier: StorageTier) -> str:
        return score_key(self._ns, self._node, tier.value)

    @property
    def sentinel_key(self) -> str:
        return tier_sentinel_key(self._ns, self._node)

    async def write(self, changes: Changes) -> None:
        """Writes the records `changes()` returns and deletes the keys of its gone blocks, in one
        transaction; `changes` is called under the write lock, and only if Redis is tried."""
        async with self._lock:
            if self._should_try():
                present, gone = changes()
                await self._run(lambda: self._write(present, gone))

    async def write_scores(self, scores: Callable[[], Scores]) -> None:
        """Updates the score sets' values (batched ZADD XX: members already there only; no
        block hashes). `scores` is called under the write lock, after every earlier write."""
        async with self._lock:
            if self._should_try() and not self.needs_resync:
                await self._run(lambda: self._write_scores(scores()))

    async def resync(self, records: Callable[[], Sequence[BlockRecord]]) -> None:
        """Makes Redis hold exactly `records()` (see the module docstring)."""
        async with self._lock:
            if self._should_try():
                everything = records()
                await self._run(lambda: self._resync(everything))

    async def load(self, hashes: Sequence[BlockHash]) -> dict[BlockHash, dict[str, str]]:
        """The stored fields of these blocks (absent ones left out); {} when Redis is down."""
        found: dict[BlockHash, dict[str, str]] = {}

        async def read() -> None:
            for start in range(0, len(hashes), BATCH):
                batch = hashes[start : start + BATCH]
                async with self._redis.pipeline(transaction=False) as pipe:
                    for block_hash in batch:
                        pipe.hgetall(self.block_key(block_hash))
                    results = await pipe.execute()
                for block_hash, fields in zip(batch, results, strict=True):
                    if fields:
                        found[block_hash] = {k.decode(): v.decode() for k, v in fields.items()}

        async with self._lock:
            await self._run(read)
        return found

    async def ping(self) -> bool:
        """Checks Redis now (whatever the retry timer says); returns and records `redis_ok`."""
        await self._run(self._redis.ping)
        return self._ok

    async def _write(self, present: Sequence[BlockRecord], gone: Sequence[BlockHash]) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.exists(self.sentinel_key)
            self._queue_deletes(pipe, gone)
            for record in present:
                self._queue_record(pipe, record)
            results = await pipe.execute()
        if not results[0]:
            log.warning("redis lost the tier's metadata (flushed or restarted): rewriting it")
            self.needs_resync = True

    async def _write_scores(self, scores: Scores) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for tier, by_hash in scores.items():
                items = list(by_hash.items())
                for start in range(0, len(items), BATCH):
                    pipe.zadd(self.score_key(tier), dict(items[start : start + BATCH]), xx=True)
            await pipe.execute()

    async def _resync(self, records: Sequence[BlockRecord]) -> None:
        keep = {self.block_key(r.block_hash).encode() for r in records}
        stale = [
            k
            async for k in self._redis.scan_iter(match=block_pattern(self._ns, self._node), count=BATCH)
            if k not in keep
        ]
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(*(self.score_key(t) for t in SCORED_TIERS))
            for start in range(0, len(stale), BATCH):
                pipe.delete(*stale[start : start + BATCH])
            for record in records:
                self._queue_record(pipe, record)
            pipe.set(self.sentinel_key, repr(time.time()))
            await pipe.execute()
        self.needs_resync = False
        self.resyncs += 1
        log.info(
            "redis: tier metadata rewritten (%d blocks, %d stale keys removed)", len(records), len(stale)
        )

    def _queue_deletes(self, pipe: Any, gone: Sequence[BlockHash]) -> None:
        for start in range(0, len(gone), BATCH):
            batch = gone[start : start + BATCH]
            pipe.delete(*(self.block_key(h) for h in batch))
            for tier in SCORED_TIERS:
                pipe.zrem(self.score_key(tier), *batch)

    def _queue_record(self, pipe: Any, record: BlockRecord) -> None:
        pipe.hset(self.block_key(record.block_hash), mapping=_fields(record))
        for tier in SCORED_TIERS:
            score = record.scores.get(tier)
            if score is None:
                pipe.zrem(self.score_key(tier), record.block_hash)
            else:
                pipe.zadd(self.score_key(tier), {record.block_hash: score})

    def _should_try(self) -> bool:
        return self._ok or self._clock() >= self._retry_at

    async def _run(self, call: Callable[[], Awaitable[Any]]) -> None:
        try:
            await call()
        except REDIS_DOWN as exc:
            if self._ok:
                log.warning("redis unreachable, serving without block metadata: %s", exc)
            self._ok = False
            self.needs_resync = True
            self._retry_at = self._clock() + self._retry_after_s
            return
        if not self._ok:
            log.info("redis reachable again; block metadata resumes")
        self._ok = True


def _fields(record: BlockRecord) -> dict[FieldT, EncodableT]:
    return {
        "tier": record.tier.value,
        "nvme_copy": int(record.nvme_copy),
        "bytes": record.size_bytes,
        "codec": record.codec.value,
        "created": record.created,
        "last_access": record.last_access,
        "hits": record.hits,
        "attention": record.attention,
        "observations": record.observations,
    }


class NoMetadata:
    """The mirror of a tier service run without Redis (tests, benchmarks): writes nothing."""

    needs_resync = False
    redis_ok = False

    async def write(self, changes: Changes) -> None:
        return None

    async def write_scores(self, scores: Callable[[], Scores]) -> None:
        return None

    async def resync(self, records: Callable[[], Sequence[BlockRecord]]) -> None:
        return None

    async def load(self, hashes: Sequence[BlockHash]) -> dict[BlockHash, dict[str, str]]:
        return {}

    async def ping(self) -> bool:
        return False
