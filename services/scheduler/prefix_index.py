"""Where a prompt's prefix blocks sit: the scheduler's only reads of Redis.

The prompt arrives as token ids (the gateway tokenized it). The scheduler hashes
its reusable blocks once, exactly as the worker's engine does
(`hashing.reusable_chain`), with the fingerprint and block size the workers
registered, and hands those hashes on to the worker it places the request on.
One pipelined round trip then asks, per live worker,
`SMISMEMBER {ns}:res:{worker} h_0 … h_k` (the blocks on its device, published by
the worker each heartbeat) and, per tier service those workers use and per block,
`HGET {ns}:tier:{node}:blk:{h} tier` (written by that tier). On a Redis Cluster the
pipeline is split by slot, and still one round trip per node.

Redis is advisory here: an error or a timeout (`redis_timeout_s`) means "no
information" — routing falls back to load alone — and Redis is left alone for
`retry_after_s` so a dead server costs no request its timeout. `failures` counts the
lookups that got no answer so (failed, timed out, or skipped while Redis rests), for
`wicore:prefix_lookup_failures_total`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from wicore.config import RedisConfig
from wicore.kv.block import StorageTier
from wicore.kv.hashing import BlockHash, reusable_chain
from wicore.redis_keys import block_key, residency_key
from wicore.redis_server import REDIS_DOWN, fast_failing_client
from wicore.scheduler.registry import WorkerInfo
from wicore.scheduler.state import PrefixInfo

log = logging.getLogger(__name__)


class PrefixIndex:
    def __init__(
        self,
        redis: RedisConfig,
        timeout_s: float,
        retry_after_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.namespace = redis.namespace
        self.retry_after_s = retry_after_s
        self.clock = clock
        self._redis = fast_failing_client(redis, timeout_s)
        self._down_until = 0.0
        self.failures = 0  # lookups routed without Redis' answer (see the module docstring)

    async def close(self) -> None:
        await self._redis.aclose()

    async def describe(
        self, token_ids: Sequence[int], cache_salt: str, workers: Sequence[WorkerInfo]
    ) -> PrefixInfo:
        """The prompt's reusable block hashes and where they sit on `workers` (one model)."""
        first = min(workers, key=lambda w: w.registered_at) if workers else None
        if first is None or first.block_size < 1:
            return PrefixInfo()
        bs = first.block_size
        hashes = tuple(reusable_chain(first.fingerprint, cache_salt, token_ids, bs))
        group = [w for w in workers if (w.fingerprint, w.block_size) == (first.fingerprint, bs)]
        nodes = sorted({w.tier_node for w in group if w.tier_node})
        device, tiers = await self.lookup([w.worker_id for w in group], nodes, hashes)
        return PrefixInfo(hashes, first.fingerprint, bs, device, tiers)

    async def lookup(
        self, worker_ids: Sequence[str], nodes: Sequence[str], hashes: Sequence[BlockHash]
    ) -> tuple[dict[str, int], dict[str, tuple[StorageTier | None, ...]]]:
        """Per worker, how many of `hashes` (from the first) it holds; per tier `node`, where
        it holds each hash."""
        if not hashes:
            return {}, {}
        if self.clock() < self._down_until:
            self.failures += 1
            return {}, {}
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for worker_id in worker_ids:
                    pipe.smismember(residency_key(self.namespace, worker_id), list(hashes))
                for node in nodes:
                    for h in hashes:
                        pipe.hget(block_key(self.namespace, node, h), "tier")
                replies = await pipe.execute()
        except REDIS_DOWN as exc:
            self.failures += 1
            if self.clock() >= self._down_until:
                log.warning("Redis did not answer (%s); routing by load alone for now", exc)
            self._down_until = self.clock() + self.retry_after_s
            return {}, {}
        device = {}
        for worker_id, flags in zip(worker_ids, replies, strict=False):
            n = 0
            while n < len(flags) and flags[n]:
                n += 1
            device[worker_id] = n
        n, rest = len(hashes), replies[len(worker_ids) :]
        tiers = {node: tuple(_tier(v) for v in rest[i * n : (i + 1) * n]) for i, node in enumerate(nodes)}
        return device, tiers


def _tier(value: bytes | None) -> StorageTier | None:
    try:
        return StorageTier(value.decode()) if value is not None else None
    except ValueError:
        return None
