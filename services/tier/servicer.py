"""The Tier gRPC service: convert the message, call the manager, convert back."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from wicore.config import TierConfig
from wicore.errors import WicoreError
from wicore.kv.block import EncodedBlock
from wicore.kv.hashing import BlockHash
from wicore.kv.wire import (
    TIER_TO_PROTO,
    ChunkAssembler,
    block_chunks,
    hashes_from_proto,
    observations_from_proto,
)
from wicore.tier.convert import stats_to_proto
from wicore.tier.manager import TierManager
from wicore.v1 import tier_pb2, tier_pb2_grpc

MAX_HASHES_PER_REQUEST = 4096
DRAIN_TIMEOUT_S = 2.0


async def _drain(chunks: AsyncIterator[tier_pb2.BlockChunk], limit_bytes: int) -> None:
    """Reads and drops what the client is still sending (bounded in bytes and time).

    A grpc.aio client whose call ends while it is still writing reports INTERNAL
    ("Internal error from Core") instead of our status; letting it finish writing
    first makes it see the INVALID_ARGUMENT that names the bad field.
    """
    seen = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            async for chunk in chunks:
                seen += len(chunk.data)
                if seen > limit_bytes:
                    return


async def _assembled(
    chunks: AsyncIterator[tier_pb2.BlockChunk], max_block_bytes: int
) -> AsyncIterator[tuple[BlockHash, EncodedBlock]]:
    assembler = ChunkAssembler(max_block_bytes)
    async for chunk in chunks:
        received = assembler.feed(chunk)
        if received is not None:
            yield received.block_hash, received.block
    assembler.finish()


class TierServicer(tier_pb2_grpc.TierServicer):
    def __init__(self, manager: TierManager, config: TierConfig) -> None:
        self.manager = manager
        self.config = config

    async def PutBlocks(
        self, request_iterator: AsyncIterator[tier_pb2.BlockChunk], context: grpc.aio.ServicerContext
    ) -> tier_pb2.PutBlocksResponse:
        try:
            result = await self.manager.put_stream(_assembled(request_iterator, self.config.max_block_bytes))
        except WicoreError:
            await _drain(request_iterator, self.config.max_block_bytes)
            raise
        return tier_pb2.PutBlocksResponse(
            stored=len(result.stored), evicted=len(result.evicted), evicted_hashes=result.evicted
        )

    async def GetBlocks(
        self, request: tier_pb2.GetBlocksRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tier_pb2.BlockChunk]:
        hashes = hashes_from_proto(request.block_hashes, "block_hashes", MAX_HASHES_PER_REQUEST)
        for block_hash, block, tier in await self.manager.get(hashes):
            for chunk in block_chunks(block_hash, block, self.config.chunk_bytes, tier):
                yield chunk

    async def Lookup(
        self, request: tier_pb2.LookupRequest, context: grpc.aio.ServicerContext
    ) -> tier_pb2.LookupResponse:
        hashes = hashes_from_proto(request.block_hashes, "block_hashes", MAX_HASHES_PER_REQUEST)
        tiers = self.manager.lookup(hashes)
        return tier_pb2.LookupResponse(prefix_blocks=len(tiers), tiers=[TIER_TO_PROTO[t] for t in tiers])

    async def Prefetch(
        self, request: tier_pb2.PrefetchRequest, context: grpc.aio.ServicerContext
    ) -> tier_pb2.PrefetchResponse:
        hashes = hashes_from_proto(request.block_hashes, "block_hashes", MAX_HASHES_PER_REQUEST)
        result = await self.manager.prefetch(hashes)
        return tier_pb2.PrefetchResponse(
            promoted=result.promoted, already_cpu=result.already_cpu, missing=result.missing
        )

    async def UpdateScores(
        self, request: tier_pb2.UpdateScoresRequest, context: grpc.aio.ServicerContext
    ) -> tier_pb2.UpdateScoresResponse:
        observations = observations_from_proto(request.observations, MAX_HASHES_PER_REQUEST)
        known = await self.manager.update_scores(observations)
        return tier_pb2.UpdateScoresResponse(updated=known, unknown=len(observations) - known)

    async def Drop(
        self, request: tier_pb2.DropRequest, context: grpc.aio.ServicerContext
    ) -> tier_pb2.DropResponse:
        hashes = hashes_from_proto(request.block_hashes, "block_hashes", MAX_HASHES_PER_REQUEST)
        return tier_pb2.DropResponse(dropped=await self.manager.drop(hashes))

    async def Stats(
        self, request: tier_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> tier_pb2.StatsResponse:
        return stats_to_proto(await self.manager.report())
