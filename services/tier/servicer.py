"""The Tier gRPC service: convert, call the store and the metadata mirror, convert back."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from wicore.config import TierConfig
from wicore.errors import WicoreError
from wicore.hashing import BlockHash
from wicore.tier.convert import ChunkAssembler, block_to_chunks, hashes_from_proto, stats_to_proto
from wicore.tier.metadata import BlockMetadata
from wicore.tier.store import CpuTier, StoredBlock
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


class TierServicer(tier_pb2_grpc.TierServicer):
    """Serves one CpuTier; Redis gets one batched write per RPC that changes or reads blocks."""

    def __init__(self, store: CpuTier, metadata: BlockMetadata, config: TierConfig) -> None:
        self.store = store
        self.metadata = metadata
        self.config = config

    async def PutBlocks(
        self, request_iterator: AsyncIterator[tier_pb2.BlockChunk], context: grpc.aio.ServicerContext
    ) -> tier_pb2.PutBlocksResponse:
        assembler = ChunkAssembler(self.config.max_block_bytes)
        stored: list[BlockHash] = []
        evicted: list[BlockHash] = []
        try:
            async for chunk in request_iterator:
                block = assembler.feed(chunk)
                if block is not None:
                    payload = bytes(block.buffer)
                    evicted += self.store.put(
                        block.block_hash, block.codec, block.dtype, block.shape, payload, block.checksum
                    )
                    stored.append(block.block_hash)
            assembler.finish()
        except WicoreError:
            await _drain(request_iterator, self.config.max_block_bytes)
            raise
        finally:
            # Blocks stored before a bad chunk stay stored; Redis must say so.
            await self.metadata.sync(self.store, stored, evicted)
        return tier_pb2.PutBlocksResponse(stored=len(stored), evicted=len(evicted), evicted_hashes=evicted)

    async def GetBlocks(
        self, request: tier_pb2.GetBlocksRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tier_pb2.BlockChunk]:
        hashes = hashes_from_proto(request.block_hashes, "block_hashes", MAX_HASHES_PER_REQUEST)
        found: list[StoredBlock] = [b for b in map(self.store.get, hashes) if b is not None]
        await self.metadata.sync(self.store, [b.block_hash for b in found], [])
        for block in found:
            for chunk in block_to_chunks(block, self.config.chunk_bytes):
                yield chunk

    async def Lookup(
        self, request: tier_pb2.LookupRequest, context: grpc.aio.ServicerContext
    ) -> tier_pb2.LookupResponse:
        hashes = hashes_from_proto(request.block_hashes, "block_hashes", MAX_HASHES_PER_REQUEST)
        prefix = self.store.lookup_prefix(hashes)
        return tier_pb2.LookupResponse(prefix_blocks=prefix, tiers=[tier_pb2.STORAGE_TIER_CPU] * prefix)

    async def Stats(
        self, request: tier_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> tier_pb2.StatsResponse:
        redis_ok = await self.metadata.ping()
        return tier_pb2.StatsResponse(tiers=[stats_to_proto(self.store.stats())], redis_ok=redis_ok)
