"""Protobuf <-> tier types, for the tier's servicer only.

A block travels as ordered chunks of one stream:

    chunk 0: header{hash, codec, lz4, dtype, shape, sink_tokens, payload_bytes, checksum},
             offset 0, data[0:c)
    chunk 1: offset c,  data[c:2c)
    ...      offsets contiguous; the bytes add up to payload_bytes exactly
    next block: its own header ...

`ChunkAssembler` checks that protocol and every header field, naming the field
it rejects, and hands back whole, checksum-verified blocks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from wicore.errors import InvalidRequest
from wicore.hashing import BlockHash, payload_checksum, validate_block_hash
from wicore.kvblock import DTYPES, RAW, KvPayload
from wicore.tier.manager import ManagerStats
from wicore.tier.store import StorageTier, TierStats
from wicore.tier_wire import CODEC_FROM_PROTO, CODEC_TO_PROTO, Observation, block_chunks
from wicore.v1 import tier_pb2

TIER_TO_PROTO = {StorageTier.CPU: tier_pb2.STORAGE_TIER_CPU, StorageTier.NVME: tier_pb2.STORAGE_TIER_NVME}
KV_DIMS = 5  # [layers, 2, tokens, kv_heads, head_dim]

_CHECKSUM_RE = re.compile(r"[0-9a-f]{32}")


@dataclass(slots=True)
class IncomingBlock:
    """A block whose header has arrived and whose payload is being assembled."""

    block_hash: BlockHash
    codec: str
    lz4: bool
    dtype: str
    shape: tuple[int, ...]
    sink_tokens: int
    payload_bytes: int
    checksum: str
    buffer: bytearray = field(default_factory=bytearray)

    @property
    def complete(self) -> bool:
        return len(self.buffer) == self.payload_bytes

    def payload(self) -> KvPayload:
        return KvPayload(self.codec, self.lz4, self.dtype, self.shape, self.sink_tokens, bytes(self.buffer),
                         self.checksum)  # fmt: skip


def header_from_proto(header: tier_pb2.BlockHeader, max_block_bytes: int) -> IncomingBlock:
    block_hash = validate_block_hash(header.block_hash, "header.block_hash")
    codec = CODEC_FROM_PROTO.get(header.codec)
    if codec is None:
        supported = sorted(tier_pb2.Codec.Name(c) for c in CODEC_FROM_PROTO)
        raise InvalidRequest("header.codec", f"unsupported codec {header.codec} (supported: {supported})")
    if header.dtype not in DTYPES:
        raise InvalidRequest(
            "header.dtype", f"expected one of {', '.join(DTYPES)}, got {header.dtype[:32]!r}"
        )
    shape = tuple(header.shape)
    if len(shape) != KV_DIMS or shape[1] != 2 or min(shape) < 1:
        raise InvalidRequest(
            "header.shape", f"expected [layers, 2, tokens, kv_heads, head_dim], got {list(shape)}"
        )
    if header.sink_tokens > shape[2] or (header.sink_tokens and codec in ("fp16", "bf16")):
        raise InvalidRequest(
            "header.sink_tokens", f"{header.sink_tokens} is not valid for {codec} {list(shape)}"
        )
    if not 0 < header.payload_bytes <= max_block_bytes:
        raise InvalidRequest(
            "header.payload_bytes", f"must be between 1 and {max_block_bytes}, got {header.payload_bytes}"
        )
    raw_bytes = math.prod(shape) * DTYPES[header.dtype].itemsize
    if codec == RAW and (header.lz4 or header.payload_bytes != raw_bytes):
        raise InvalidRequest(
            "header.payload_bytes", f"RAW {header.dtype} {list(shape)}: {raw_bytes} bytes, no lz4"
        )
    if _CHECKSUM_RE.fullmatch(header.checksum) is None:
        raise InvalidRequest("header.checksum", "expected 32 lowercase hex characters (XXH3-128)")
    return IncomingBlock(block_hash, codec, header.lz4, header.dtype, shape, header.sink_tokens,
                         header.payload_bytes, header.checksum)  # fmt: skip


class ChunkAssembler:
    """Turns a PutBlocks chunk stream into whole blocks, one at a time."""

    def __init__(self, max_block_bytes: int) -> None:
        self._max_block_bytes = max_block_bytes
        self._current: IncomingBlock | None = None

    def feed(self, chunk: tier_pb2.BlockChunk) -> IncomingBlock | None:
        """Adds one chunk; returns the block it completes, if any."""
        block_hash = validate_block_hash(chunk.block_hash, "block_hash")
        current = self._current
        if current is None:
            if not chunk.HasField("header"):
                raise InvalidRequest("header", f"the first chunk of block {block_hash} must carry its header")
            current = header_from_proto(chunk.header, self._max_block_bytes)
            if current.block_hash != block_hash:
                raise InvalidRequest("header.block_hash", f"{current.block_hash} != chunk's {block_hash}")
            self._current = current
        elif chunk.HasField("header") or block_hash != current.block_hash:
            raise InvalidRequest("data", self._short(current))
        if chunk.offset != len(current.buffer):
            raise InvalidRequest(
                "offset", f"block {block_hash}: expected offset {len(current.buffer)}, got {chunk.offset}"
            )
        if len(current.buffer) + len(chunk.data) > current.payload_bytes:
            raise InvalidRequest("data", f"block {block_hash}: over payload_bytes={current.payload_bytes}")
        current.buffer += chunk.data
        if not current.complete:
            return None
        self._current = None
        if payload_checksum(current.buffer) != current.checksum:
            raise InvalidRequest("header.checksum", f"block {block_hash}: payload does not match checksum")
        return current

    def finish(self) -> None:
        """Raises if the stream ended in the middle of a block."""
        if self._current is not None:
            raise InvalidRequest("data", self._short(self._current))

    @staticmethod
    def _short(block: IncomingBlock) -> str:
        return f"block {block.block_hash} ended after {len(block.buffer)} of {block.payload_bytes} bytes"


def block_to_chunks(
    block_hash: BlockHash, block: KvPayload, tier: StorageTier, chunk_bytes: int
) -> Iterator[tier_pb2.BlockChunk]:
    """One block as ordered chunks of at most `chunk_bytes`; the first carries the header."""
    return block_chunks(block_hash, block, chunk_bytes, TIER_TO_PROTO[tier])


def hashes_from_proto(values: Sequence[str], field_name: str, limit: int) -> list[BlockHash]:
    if len(values) > limit:
        raise InvalidRequest(field_name, f"at most {limit} hashes per request, got {len(values)}")
    return [validate_block_hash(v, f"{field_name}[{i}]") for i, v in enumerate(values)]


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


def tier_stats_to_proto(stats: TierStats, manager: ManagerStats) -> tier_pb2.TierStats:
    params = manager.params.get(stats.tier)
    return tier_pb2.TierStats(
        tier=TIER_TO_PROTO[stats.tier],
        capacity_bytes=stats.capacity_bytes,
        used_bytes=stats.used_bytes,
        blocks=stats.blocks,
        hits=stats.hits,
        misses=stats.misses,
        bytes_in=stats.bytes_in,
        bytes_out=stats.bytes_out,
        evictions=stats.evictions,
        codec=CODEC_TO_PROTO[stats.codec],
        pressure=stats.pressure,
        eviction_threshold=params.eviction_threshold if params else 0.0,
        time_decay_factor=params.time_decay_factor if params else 0.0,
    )


def stats_to_proto(stats: ManagerStats) -> tier_pb2.StatsResponse:
    return tier_pb2.StatsResponse(
        tiers=[tier_stats_to_proto(t, stats) for t in stats.tiers],
        redis_ok=stats.redis_ok,
        policy=stats.policy,
        blocks_demoted=stats.blocks_demoted,
        bytes_demoted=stats.bytes_demoted,
        blocks_promoted=stats.blocks_promoted,
        bytes_promoted=stats.bytes_promoted,
        corrupt_blocks=stats.corrupt_blocks,
        nvme_write_errors=stats.nvme_write_errors,
    )
