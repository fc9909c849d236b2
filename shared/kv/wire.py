"""KV blocks on the tier service's wire: the only block code that imports protobuf.

A stream of blocks (PutBlocks' request, GetBlocks' reply) is ordered chunks:

    chunk 0: header{hash, codec, lz4, dtype, shape, sink_tokens, payload_bytes, checksum,
             source_tier}, offset 0, data[0:c)
    chunk 1: offset c, data[c:2c)   ... offsets contiguous, adding up to payload_bytes
    next block: its own header ...

`block_chunks` writes that; `ChunkAssembler` reads it, at both ends: it checks the
protocol and every header field (`BlockHeader`'s checks, the field named as
`header.<field>`), and hands back whole, checksum-verified blocks. A chunk is well
under the services' gRPC message limit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from wicore.errors import InvalidRequest
from wicore.kv.attention import Observation
from wicore.kv.block import BlockHeader, Codec, EncodedBlock, StorageTier
from wicore.kv.hashing import BlockHash, payload_checksum, validate_block_hash
from wicore.v1 import tier_pb2

CODEC_TO_PROTO = {
    Codec.RAW: tier_pb2.CODEC_RAW,
    Codec.FP16: tier_pb2.CODEC_FP16,
    Codec.BF16: tier_pb2.CODEC_BF16,
    Codec.Q8: tier_pb2.CODEC_Q8,
    Codec.Q4: tier_pb2.CODEC_Q4,
}
CODEC_FROM_PROTO = {proto: codec for codec, proto in CODEC_TO_PROTO.items()}
TIER_TO_PROTO = {
    StorageTier.DEVICE: tier_pb2.STORAGE_TIER_DEVICE,
    StorageTier.CPU: tier_pb2.STORAGE_TIER_CPU,
    StorageTier.NVME: tier_pb2.STORAGE_TIER_NVME,
}
TIER_FROM_PROTO = {proto: tier for tier, proto in TIER_TO_PROTO.items()}


def tier_from_proto(value: int) -> StorageTier | None:
    """The tier a reply names; None for STORAGE_TIER_UNSPECIFIED (or a value this build lacks)."""
    return TIER_FROM_PROTO.get(value)


def block_chunks(
    block_hash: BlockHash, block: EncodedBlock, chunk_bytes: int, source_tier: StorageTier | None = None
) -> Iterator[tier_pb2.BlockChunk]:
    """One block as ordered chunks of at most `chunk_bytes`; the first carries the header."""
    h = block.header
    header = tier_pb2.BlockHeader(
        block_hash=block_hash,
        codec=CODEC_TO_PROTO[h.codec],
        dtype=h.dtype,
        shape=h.shape,
        payload_bytes=h.payload_bytes,
        checksum=h.checksum,
        lz4=h.lz4,
        sink_tokens=h.sink_tokens,
        source_tier=TIER_TO_PROTO[source_tier] if source_tier else tier_pb2.STORAGE_TIER_UNSPECIFIED,
    )
    payload = block.payload
    for offset in range(0, len(payload), chunk_bytes):
        chunk = tier_pb2.BlockChunk(
            block_hash=block_hash, offset=offset, data=payload[offset : offset + chunk_bytes]
        )
        if offset == 0:
            chunk.header.CopyFrom(header)
        yield chunk


@dataclass(frozen=True, slots=True)
class ReceivedBlock:
    block_hash: BlockHash
    block: EncodedBlock
    source_tier: StorageTier | None  # where the tier found it (GetBlocks); None in PutBlocks


@dataclass(slots=True)
class _Incoming:
    block_hash: BlockHash
    header: BlockHeader
    source_tier: StorageTier | None
    buffer: bytearray = field(default_factory=bytearray)


def header_from_proto(header: tier_pb2.BlockHeader, max_block_bytes: int) -> BlockHeader:
    """The header, checked; InvalidRequest names the field as `header.<field>`."""
    codec = CODEC_FROM_PROTO.get(header.codec)
    if codec is None:
        supported = sorted(tier_pb2.Codec.Name(c) for c in CODEC_FROM_PROTO)
        raise InvalidRequest("header.codec", f"unsupported codec {header.codec} (supported: {supported})")
    if not 0 < header.payload_bytes <= max_block_bytes:
        raise InvalidRequest(
            "header.payload_bytes", f"must be between 1 and {max_block_bytes}, got {header.payload_bytes}"
        )
    try:
        return BlockHeader(codec, header.lz4, header.dtype, tuple(header.shape), header.sink_tokens,
                           header.payload_bytes, header.checksum)  # fmt: skip
    except InvalidRequest as exc:
        raise InvalidRequest(f"header.{exc.field}", str(exc).removeprefix(f"{exc.field}: ")) from None


class ChunkAssembler:
    """Turns a chunk stream into whole blocks, one at a time (see the module docstring)."""

    def __init__(self, max_block_bytes: int) -> None:
        self._max_block_bytes = max_block_bytes
        self._current: _Incoming | None = None

    def feed(self, chunk: tier_pb2.BlockChunk) -> ReceivedBlock | None:
        """Adds one chunk; returns the block it completes, if any. InvalidRequest if the
        stream breaks the protocol or a block its checksum."""
        block_hash = validate_block_hash(chunk.block_hash, "block_hash")
        current = self._current
        if current is None:
            if not chunk.HasField("header"):
                raise InvalidRequest("header", f"the first chunk of block {block_hash} must carry its header")
            header_hash = validate_block_hash(chunk.header.block_hash, "header.block_hash")
            if header_hash != block_hash:
                raise InvalidRequest("header.block_hash", f"{header_hash} != chunk's {block_hash}")
            header = header_from_proto(chunk.header, self._max_block_bytes)
            current = self._current = _Incoming(block_hash, header, tier_from_proto(chunk.header.source_tier))
        elif chunk.HasField("header") or block_hash != current.block_hash:
            raise InvalidRequest("data", self._short(current))
        if chunk.offset != len(current.buffer):
            raise InvalidRequest(
                "offset", f"block {block_hash}: expected offset {len(current.buffer)}, got {chunk.offset}"
            )
        expected = current.header.payload_bytes
        if len(current.buffer) + len(chunk.data) > expected:
            raise InvalidRequest("data", f"block {block_hash}: over payload_bytes={expected}")
        current.buffer += chunk.data
        if len(current.buffer) < expected:
            return None
        self._current = None
        if payload_checksum(current.buffer) != current.header.checksum:
            raise InvalidRequest("header.checksum", f"block {block_hash}: payload does not match checksum")
        return ReceivedBlock(
            block_hash, EncodedBlock(current.header, bytes(current.buffer)), current.source_tier
        )

    def finish(self) -> None:
        """Raises if the stream ended in the middle of a block."""
        if self._current is not None:
            raise InvalidRequest("data", self._short(self._current))

    @staticmethod
    def _short(block: _Incoming) -> str:
        return (
            f"block {block.block_hash} ended after {len(block.buffer)} of {block.header.payload_bytes} bytes"
        )


def hashes_from_proto(values: Sequence[str], field_name: str, limit: int) -> list[BlockHash]:
    if len(values) > limit:
        raise InvalidRequest(field_name, f"at most {limit} hashes per request, got {len(values)}")
    return [validate_block_hash(v, f"{field_name}[{i}]") for i, v in enumerate(values)]


def observations_to_proto(observations: Sequence[Observation]) -> tier_pb2.UpdateScoresRequest:
    return tier_pb2.UpdateScoresRequest(
        observations=[
            tier_pb2.AttentionObservation(
                block_hash=o.block_hash, mass=o.mass, blocks_in_sequence=o.blocks_in_sequence
            )
            for o in observations
        ]
    )


def observations_from_proto(values: Sequence[tier_pb2.AttentionObservation], limit: int) -> list[Observation]:
    if len(values) > limit:
        raise InvalidRequest("observations", f"at most {limit} per request, got {len(values)}")
    out: list[Observation] = []
    for i, obs in enumerate(values):
        block_hash = validate_block_hash(obs.block_hash, f"observations[{i}].block_hash")
        if not 0.0 <= obs.mass <= 1.0:  # also rejects NaN
            raise InvalidRequest(f"observations[{i}].mass", f"must be in [0, 1], got {obs.mass}")
        if obs.blocks_in_sequence < 1:
            raise InvalidRequest(f"observations[{i}].blocks_in_sequence", "must be >= 1")
        out.append(Observation(block_hash, obs.mass, obs.blocks_in_sequence))
    return out
