"""What a KV block is once it leaves the device: where it can live, how it is encoded, its header.

    StorageTier   DEVICE | CPU | NVME          where a copy of a block lives
    Codec         RAW | FP16 | BF16 | Q8 | Q4  how its K and V became bytes (`wicore.kv.codecs`)
    BlockHeader   codec, lz4, dtype, shape, sink_tokens, payload_bytes, checksum
    EncodedBlock  BlockHeader + payload bytes

A block's tensor is [layers, 2, tokens, kv_heads, head_dim] (dim 1: 0 = keys,
1 = values) of one of `DTYPE_BYTES`. The header is the one description of an encoded
block: the wire (`wicore.kv.wire`) and the NVMe file format (`wicore.tier.nvme`)
both carry exactly these fields, and every check of them is `BlockHeader`'s own,
raising InvalidRequest that names the field. `checksum` is `payload_checksum` of the
payload and travels with it, so every hop can refuse a damaged block (`verify`).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from wicore.errors import InvalidRequest
from wicore.kv.hashing import is_digest_hex, payload_checksum

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}  # the dtypes a block may have, by torch name
KV_DIMS = 5  # [layers, 2, tokens, kv_heads, head_dim]
_U32_MAX = 0xFFFFFFFF


class StorageTier(enum.Enum):
    """Where a copy of a block lives, fastest first."""

    DEVICE = "device"  # a worker's KV pool (GPU memory, or RAM on a CPU worker)
    CPU = "cpu"  # the tier service's RAM
    NVME = "nvme"  # the tier service's block files

    @property
    def label(self) -> str:
        """The tier's name in messages: "device", "CPU", "NVMe"."""
        return {"device": "device", "cpu": "CPU", "nvme": "NVMe"}[self.value]


class Codec(enum.Enum):
    """How a block's values became payload bytes; see `wicore.kv.codecs` for the error bounds."""

    RAW = "raw"  # the tensor's own bytes: lossless for every dtype
    FP16 = "fp16"
    BF16 = "bf16"
    Q8 = "q8"  # int8, keeps `sink_tokens` leading tokens as fp16
    Q4 = "q4"  # 4-bit, likewise

    @property
    def keeps_sinks(self) -> bool:
        """Whether `sink_tokens` means something to this codec (RAW records it for a later q8/q4)."""
        return self in (Codec.RAW, Codec.Q8, Codec.Q4)


@dataclass(frozen=True, slots=True)
class BlockHeader:
    """Everything about an encoded block but its bytes; valid by construction."""

    codec: Codec
    lz4: bool  # the payload is an lz4 frame
    dtype: str  # the tensor's dtype before encoding, a key of DTYPE_BYTES
    shape: tuple[int, ...]  # the tensor's shape before encoding
    sink_tokens: int  # leading tokens q8/q4 keep as fp16; 0 for fp16/bf16
    payload_bytes: int
    checksum: str  # payload_checksum(payload): 32 lowercase hex characters

    def __post_init__(self) -> None:
        if not isinstance(self.codec, Codec):
            raise InvalidRequest("codec", f"expected a Codec, got {self.codec!r}")
        if self.dtype not in DTYPE_BYTES:
            raise InvalidRequest(
                "dtype", f"expected one of {', '.join(DTYPE_BYTES)}, got {self.dtype[:32]!r}"
            )
        shape = self.shape
        if len(shape) != KV_DIMS or shape[1] != 2 or not all(1 <= d <= _U32_MAX for d in shape):
            raise InvalidRequest(
                "shape", f"expected [layers, 2, tokens, kv_heads, head_dim], got {list(shape)}"
            )
        limit = shape[2] if self.codec.keeps_sinks else 0
        if not 0 <= self.sink_tokens <= limit:
            raise InvalidRequest(
                "sink_tokens",
                f"{self.sink_tokens} out of range 0..{limit} for {self.codec.value} {list(shape)}",
            )
        if self.payload_bytes < 1:
            raise InvalidRequest("payload_bytes", f"must be positive, got {self.payload_bytes}")
        if self.codec is Codec.RAW and (self.lz4 or self.payload_bytes != self.raw_bytes):
            raise InvalidRequest(
                "payload_bytes", f"raw {self.dtype} {list(shape)}: {self.raw_bytes} bytes without lz4, "
                f"got {self.payload_bytes}{' with lz4' if self.lz4 else ''}",
            )  # fmt: skip
        if not is_digest_hex(self.checksum):
            raise InvalidRequest("checksum", "expected 32 lowercase hex characters (XXH3-128)")

    @property
    def raw_bytes(self) -> int:
        """The tensor's size in its own dtype."""
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


@dataclass(frozen=True, slots=True)
class EncodedBlock:
    """An encoded block: its header and exactly `header.payload_bytes` of payload."""

    header: BlockHeader
    payload: bytes

    def __post_init__(self) -> None:
        if len(self.payload) != self.header.payload_bytes:
            raise InvalidRequest(
                "payload", f"{len(self.payload)} bytes, its header says {self.header.payload_bytes}"
            )

    @classmethod
    def of(
        cls, codec: Codec, lz4: bool, dtype: str, shape: tuple[int, ...], sink_tokens: int, payload: bytes
    ) -> EncodedBlock:
        """A block of freshly encoded bytes: the header's length and checksum computed here."""
        header = BlockHeader(codec, lz4, dtype, shape, sink_tokens, len(payload), payload_checksum(payload))
        return cls(header, payload)

    @property
    def nbytes(self) -> int:
        return self.header.payload_bytes

    def verify(self) -> bool:
        """Whether the payload still matches its checksum."""
        return payload_checksum(self.payload) == self.header.checksum
