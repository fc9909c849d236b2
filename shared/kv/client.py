"""A client of the tier service (workers: Lookup, GetBlocks, PutBlocks, UpdateScores, and
Stats for the tier's name; the scheduler: Prefetch).

The tier is an optimisation, never a dependency: a call that fails (the tier down,
restarting, or slower than `timeout_s`) marks it unavailable for `retry_after_s`,
during which every call returns "nothing" at once; the worker then recomputes, and
clients see no error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import grpc

from wicore.channels import InternalAuth, internal_channel
from wicore.config import TierConfig
from wicore.errors import InvalidRequest
from wicore.kv.attention import Observation
from wicore.kv.block import EncodedBlock, StorageTier
from wicore.kv.hashing import BlockHash
from wicore.kv.wire import ChunkAssembler, block_chunks, observations_to_proto, tier_from_proto
from wicore.v1 import tier_pb2, tier_pb2_grpc

log = logging.getLogger(__name__)

CHUNK_BYTES = TierConfig().chunk_bytes
MAX_BLOCK_BYTES = TierConfig().max_block_bytes


class TierClient:
    """One channel to the tier; owns the `available` flag (see the module docstring)."""

    def __init__(
        self,
        address: str,
        timeout_s: float = 5.0,
        retry_after_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        auth: InternalAuth | None = None,  # the internal token its calls carry
    ) -> None:
        self.address = address
        self._channel = internal_channel(address, auth or InternalAuth())
        self._stub = tier_pb2_grpc.TierStub(self._channel)
        self._timeout_s = timeout_s
        self._retry_after_s = retry_after_s
        self._clock = clock
        self._down_until = 0.0

    @property
    def available(self) -> bool:
        return self._clock() >= self._down_until

    async def close(self) -> None:
        await self._channel.close()

    async def lookup(self, hashes: Sequence[BlockHash]) -> list[StorageTier]:
        """The tier of each leading block of the chain the tier service holds."""
        if not hashes or not self.available:
            return []
        try:
            reply = await self._stub.Lookup(
                tier_pb2.LookupRequest(block_hashes=hashes), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            self._failed("Lookup", exc)
            return []
        return [tier_from_proto(t) or StorageTier.CPU for t in reply.tiers]

    async def get(self, hashes: Sequence[BlockHash]) -> dict[BlockHash, tuple[EncodedBlock, StorageTier]]:
        """The blocks the tier still holds (each verified), with the tier each came from."""
        if not hashes or not self.available:
            return {}
        found: dict[BlockHash, tuple[EncodedBlock, StorageTier]] = {}
        stream = self._stub.GetBlocks(tier_pb2.GetBlocksRequest(block_hashes=hashes), timeout=self._timeout_s)
        assembler = ChunkAssembler(MAX_BLOCK_BYTES)
        try:
            async for chunk in stream:
                received = assembler.feed(chunk)
                if received is not None:
                    found[received.block_hash] = (received.block, received.source_tier or StorageTier.CPU)
            assembler.finish()
        except (grpc.aio.AioRpcError, InvalidRequest) as exc:  # InvalidRequest: a malformed stream
            self._failed("GetBlocks", exc)
            stream.cancel()
        return found

    async def put(self, blocks: Sequence[tuple[BlockHash, EncodedBlock]]) -> bool:
        """Stores blocks; False if the tier did not take them all (they are then simply not offloaded)."""
        if not blocks or not self.available:
            return False
        chunks = (c for block_hash, block in blocks for c in block_chunks(block_hash, block, CHUNK_BYTES))
        try:
            reply = await self._stub.PutBlocks(chunks, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            self._failed("PutBlocks", exc)
            return False
        return reply.stored == len(blocks)

    async def update_scores(self, observations: Sequence[Observation]) -> None:
        if not observations or not self.available:
            return
        try:
            await self._stub.UpdateScores(observations_to_proto(observations), timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            self._failed("UpdateScores", exc)

    async def node(self, timeout_s: float = 1.0) -> str:
        """The tier's name (`tier.node`); "" when it does not answer (nothing is marked down:
        a worker asks this before the tier has started, and asks again)."""
        try:
            reply = await self._stub.Stats(tier_pb2.StatsRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return ""
        return reply.node

    async def prefetch(self, hashes: Sequence[BlockHash]) -> None:
        if not hashes or not self.available:
            return
        try:
            await self._stub.Prefetch(tier_pb2.PrefetchRequest(block_hashes=hashes), timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            self._failed("Prefetch", exc)

    def _failed(self, call: str, exc: Exception) -> None:
        if self.available:
            log.warning("tier %s: %s failed (%s); recomputing without it for %.1f s",
                        self.address, call, exc, self._retry_after_s)  # fmt: skip
        self._down_until = self._clock() + self._retry_after_s
