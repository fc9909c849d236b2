"""Publishes the worker's device prefix cache to Redis, for the scheduler's routing.

    {ns}:res:{worker_id}   set of block hashes (32 hex chars) on this worker's device

Once per heartbeat, as a diff against what was last published (SADD the new
hashes, SREM the evicted ones, EXPIRE the key), in one MULTI/EXEC: no per-token
or per-block round trips. The first publication, and the first after Redis
failed, rewrites the set whole (DEL + SADD), so a restarted worker never
advertises the blocks of its previous life. The key expires after `ttl_s` if
the worker stops publishing. Redis being down only costs routing quality: errors
are logged once and retried at the next heartbeat.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable

from wicore.config import RedisConfig
from wicore.kv.hashing import BlockHash
from wicore.redis_keys import residency_key
from wicore.redis_server import REDIS_DOWN, fast_failing_client

log = logging.getLogger(__name__)

SADD_BATCH = 4096  # members per SADD/SREM command


def _batches(items: list[BlockHash]) -> Iterable[list[BlockHash]]:
    for i in range(0, len(items), SADD_BATCH):
        yield items[i : i + SADD_BATCH]


class ResidencyPublisher:
    def __init__(self, redis: RedisConfig, worker_id: str, ttl_s: float, timeout_s: float = 1.0):
        self.key = residency_key(redis.namespace, worker_id)
        self.ttl_s = max(1, int(ttl_s))
        self._redis = fast_failing_client(redis, timeout_s)
        self._published: frozenset[BlockHash] | None = None  # None: rewrite whole next time
        self._ok = True

    async def publish(self, hashes: frozenset[BlockHash]) -> None:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                if self._published is None:
                    pipe.delete(self.key)
                    added, removed = sorted(hashes), []
                else:
                    added, removed = sorted(hashes - self._published), sorted(self._published - hashes)
                for batch in _batches(added):
                    pipe.sadd(self.key, *batch)
                for batch in _batches(removed):
                    pipe.srem(self.key, *batch)
                pipe.expire(self.key, self.ttl_s)
                await pipe.execute()
        except REDIS_DOWN as exc:
            if self._ok:
                log.warning("cannot publish residency to Redis (%s); routing ignores its cache", exc)
            self._ok, self._published = False, None
            return
        if not self._ok:
            log.info("residency published to Redis again")
        self._ok, self._published = True, hashes

    async def clear(self) -> None:
        """Removes the key (the worker is leaving); errors are ignored."""
        with contextlib.suppress(*REDIS_DOWN):
            await self._redis.delete(self.key)

    async def close(self) -> None:
        await self._redis.aclose()
