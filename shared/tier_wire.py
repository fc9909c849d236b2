"""KV blocks on the Tier service's wire: the codec enum and the chunked block stream.

    chunk 0: header{hash, codec, lz4, dtype, shape, sink_tokens, payload_bytes, checksum,
             source_tier}, offset 0, data[0:c)
    chunk 1: offset c, data[c:2c)   ... offsets contiguous, adding up to payload_bytes
    next block: its own header ...

Both ends use this module: the tier service (with its own strict validation of what
it receives, `wicore.tier.convert`) and its clients (workers, tests, benchmarks).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from wicore.hashing import BlockHash, payload_checksum
from wicore.kvblock import RAW, KvPayload
from wicore.v1 import tier_pb2

CODEC_FROM_PROTO = {
    tier_pb2.CODEC_RAW: RAW,
    tier_pb2.CODEC_FP16: "fp16",
    tier_pb2.CODEC_BF16: "bf16",
    tier_pb2.CODEC_Q8: "q8",
    tier_pb2.CODEC_Q4: "q4",
}
CODEC_TO_PROTO = {codec: proto for proto, codec in CODEC_FROM_PROTO.items()}


@dataclass(frozen=True, slots=True)
class Observation:
    """`mass` of a sequence's attention (one measurement) fell on this block (UpdateScores)."""

    block_hash: BlockHash
    mass: float
    blocks_in_sequence: int


class BadStream(Exception):
    """A GetBlocks stream that breaks the chunk protocol or a checksum."""


def block_chunks(
    block_hash: str,
    block: KvPayload,
    chunk_bytes: int,
    source_tier: tier_pb2.StorageTier.ValueType = tier_pb2.STORAGE_TIER_UNSPECIFIED,
) -> Iterator[tier_pb2.BlockChunk]:
    """One block as ordered chunks of at most `chunk_bytes`; the first carries the header."""
    header = tier_pb2.BlockHeader(
        block_hash=block_hash,
        codec=CODEC_TO_PROTO[block.codec],
        dtype=block.dtype,
        shape=block.shape,
        payload_bytes=block.nbytes,
        checksum=block.checksum,
        lz4=block.lz4,
        sink_tokens=block.sink_tokens,
        source_tier=source_tier,
    )
    payload = block.payload
    for offset in range(0, len(payload), chunk_bytes):
        chunk = tier_pb2.BlockChunk(
            block_hash=block_hash, offset=offset, data=payload[offset : offset + chunk_bytes]
        )
        if offset == 0:
            chunk.header.CopyFrom(header)
        yield chunk


async def read_blocks(
    chunks: AsyncIterator[tier_pb2.BlockChunk],
) -> AsyncIterator[tuple[BlockHash, KvPayload, tier_pb2.StorageTier.ValueType]]:
    """Whole, checksum-verified blocks from a GetBlocks stream; BadStream if it is malformed."""
    header: tier_pb2.BlockHeader | None = None
    buffer = bytearray()
    async for chunk in chunks:
        if chunk.HasField("header"):
            if header is not None:
                raise BadStream(f"block {header.block_hash} ended after {len(buffer)} bytes")
            header, buffer = chunk.header, bytearray()
        if header is None or chunk.block_hash != header.block_hash or chunk.offset != len(buffer):
            raise BadStream(f"unexpected chunk of block {chunk.block_hash!r} at offset {chunk.offset}")
        buffer += chunk.data
        if len(buffer) < header.payload_bytes:
            continue
        if len(buffer) > header.payload_bytes or payload_checksum(buffer) != header.checksum:
            raise BadStream(f"block {header.block_hash}: payload does not match its header")
        codec = CODEC_FROM_PROTO.get(header.codec)
        if codec is None:
            raise BadStream(f"block {header.block_hash}: unknown codec {header.codec}")
        block = KvPayload(codec, header.lz4, header.dtype, tuple(header.shape), header.sink_tokens,
                          bytes(buffer), header.checksum)  # fmt: skip
        yield BlockHash(header.block_hash), block, header.source_tier
        header = None
    if header is not None:
        raise BadStream(f"block {header.block_hash} ended after {len(buffer)} bytes")
