"""The Tier gRPC service: convert the message, call the manager, convert back.

Each data RPC puts what it did on its server span (`wicore.tier.*` attributes: blocks
and bytes by tier, codecs); with tracing off the span is a no-op and nothing is computed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace

from wicore.config import TierConfig
from wicore.errors import WicoreError
from wicore.kv.block import EncodedBlock, StorageTier
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


async def _counted(
    blocks: AsyncIterator[tuple[BlockHash, EncodedBlock]], received: list[int]
) -> AsyncIterator[tuple[BlockHash, EncodedBlock]]:
    """`blocks`, adding each one's payload bytes to `received[0]`."""
    async for block_hash, block in blocks:
        received[0] += block.nbytes
        yield block_hash, block


def _by_tier(tiers: list[StorageTier]) -> dict[str, int]:
    """`wicore.tier.cpu_blocks` / `nvme_blocks`: how many of `tiers` are each."""
    return {
        "wicore.tier.cpu_blocks": sum(t is StorageTier.CPU for t in tiers),
        "wicore.tier.nvme_blocks": sum(t is StorageTier.NVME for t in tiers),
    }


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
        span = trace.get_current_span()
        blocks = _assembled(request_iterator, self.config.max_block_bytes)
        received = [0]
        try:
            result = await self.manager.put_stream(
                _counted(blocks, received) if span.is_recording() else blocks
            )
        except WicoreError:
            await _drain(request_iterator, self.config.max_block_bytes)
            raise
        if span.is_recording():
            c = self.config
            span.set_attributes(
                {
                    "wicore.tier.stored": len(result.stored),
                    "wicore.tier.evicted": len(result.evicted),
                    "wicore.tier.bytes": received[0],  # payload bytes received
                    "wicore.tier.codec": (c.cpu_codec if c.cpu_capacity_bytes > 0 else c.nvme_codec).value,
                }
            )
        return tier_pb2.PutBlocksResponse(
            stored=len(result.stored), evicted=len(result.evicted), evicted_hashes=result.evicted
        )

    async def GetBlocks(
        self, request: tier_pb2.GetBlocksRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tier_pb2.BlockChunk]:
        hashes = hashes_from_proto(request.block_hashes, "block_hashes", MAX_HASHES_PER_REQUEST)
        found = await self.manager.get(hashes)
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes(
                {
                    "wicore.tier.blocks_requested": len(hashes),
                    **_by_tier([tier for _, _, tier in found]),
                    "wicore.tier.bytes": sum(block.nbytes for _, block, _ in found),
                    "wicore.tier.codecs": sorted({block.header.codec.value for _, block, _ in found}),
                }
            )
        for block_hash, block, tier in found:
            for chunk in block_chunks(block_hash, block, self.config.chunk_bytes, tier):
                yield chunk

    async def Lookup(
        self, request: tier_pb2.LookupRequest, context: grpc.aio.ServicerContext
    ) -> tier_pb2.LookupResponse:
        hashes = hashes_from_proto(request.block_hashes, "block_hashes", MAX_HASHES_PER_REQUEST)
        tiers = self.manager.lookup(hashes)
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes(
                {
                    "wicore.tier.blocks_requested": len(hashes),
                    "wicore.tier.prefix_blocks": len(tiers),
                    **_by_tier(tiers),
                }
            )
        return tier_pb2.LookupResponse(prefix_blocks=len(tiers), tiers=[TIER_TO_PROTO[t] for t in tiers])

    async def Prefetch(
        self, request: tier_pb2.PrefetchRequest, context: grpc.aio.ServicerContext
    ) -> tier_pb2.PrefetchResponse:
        hashes = hashes_from_proto(request.block_hashes, "block_hashes", MAX_HASHES_PER_REQUEST)
        result = await self.manager.prefetch(hashes)
        trace.get_current_span().set_attributes(
            {
                "wicore.tier.blocks_requested": len(hashes),
                "wicore.tier.promoted": result.promoted,
                "wicore.tier.already_cpu": result.already_cpu,
                "wicore.tier.missing": result.missing,
            }
        )
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
        reply = stats_to_proto(await self.manager.report())
        reply.node = self.config.node
        return reply
