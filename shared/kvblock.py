"""A KV block as stored and shipped between worker and tier: codec + metadata + payload bytes.

    KvPayload(codec, lz4, dtype, shape, sink_tokens, payload, checksum)

`codec` is "raw" (the tensor's own bytes, lossless for every dtype) or one of
`wicore.codecs` ("fp16", "bf16", "q8", "q4"); `checksum` is `payload_checksum(payload)`
and travels with the bytes, so every hop can refuse a damaged block. The worker
encodes with the codec it is told, the tier keeps each copy in its tier's codec
(`transcode`), and whoever loads a block back calls `decode_kv`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wicore.codecs import DTYPES, CodecName, EncodedBlock, codec_from_name, decode_block, encode_block
from wicore.hashing import payload_checksum

RAW = "raw"
CODECS = (RAW, *(c.value for c in CodecName))


def check_codec(name: str, field: str) -> str:
    """`name` if it is a known codec, else ValueError naming `field`."""
    if name not in CODECS:
        raise ValueError(f"{field}: unknown KV codec {name!r} (supported: {', '.join(CODECS)})")
    return name


@dataclass(frozen=True, slots=True)
class KvPayload:
    codec: str
    lz4: bool
    dtype: str  # the tensor's dtype before encoding
    shape: tuple[int, ...]  # [layers, 2, tokens, kv_heads, head_dim]
    # leading tokens kept as fp16 by q8/q4; for "raw", how many a later q8/q4 encoding should keep
    sink_tokens: int
    payload: bytes
    checksum: str

    @property
    def nbytes(self) -> int:
        return len(self.payload)

    def verify(self) -> bool:
        return payload_checksum(self.payload) == self.checksum


def encode_kv(kv: torch.Tensor, codec: str, *, sink_tokens: int = 0, use_lz4: bool = True) -> KvPayload:
    """Encodes a CPU tensor [layers, 2, tokens, kv_heads, head_dim] with `codec`."""
    check_codec(codec, "codec")
    if codec == RAW:
        dtype = str(kv.dtype).removeprefix("torch.")
        if dtype not in DTYPES or kv.device.type != "cpu":
            raise ValueError(
                f"kv: expected a CPU tensor of {', '.join(DTYPES)}, got {kv.dtype} on {kv.device}"
            )
        if kv.dim() != 5 or not 0 <= sink_tokens <= kv.shape[2]:
            raise ValueError(f"kv: expected 5 dims and 0 <= sink_tokens <= tokens, got {tuple(kv.shape)}")
        data = kv.contiguous().view(torch.uint8).numpy().tobytes()
        return KvPayload(RAW, False, dtype, tuple(kv.shape), sink_tokens, data, payload_checksum(data))
    block = encode_block(kv, codec_from_name(codec), sink_tokens=sink_tokens, use_lz4=use_lz4)
    return KvPayload(
        codec,
        block.lz4,
        block.dtype,
        block.shape,
        block.sink_tokens,
        block.payload,
        payload_checksum(block.payload),
    )


def decode_kv(block: KvPayload) -> torch.Tensor:
    """The block's tensor in its original dtype and shape; ValueError if the payload is malformed."""
    if block.codec == RAW:
        dtype = DTYPES.get(block.dtype)
        if dtype is None:
            raise ValueError(f"dtype: unsupported {block.dtype!r} (supported: {', '.join(DTYPES)})")
        numel = 1
        for dim in block.shape:
            numel *= dim
        expected = numel * dtype.itemsize
        if block.lz4 or len(block.payload) != expected:
            raise ValueError(
                f"payload: {len(block.payload)} bytes, expected {expected} raw bytes for {block.shape}"
            )
        return torch.frombuffer(bytearray(block.payload), dtype=dtype).reshape(block.shape)
    encoded = EncodedBlock(
        codec_from_name(check_codec(block.codec, "codec")),
        block.lz4,
        block.dtype,
        tuple(block.shape),
        block.sink_tokens,
        block.payload,
    )
    return decode_block(encoded)


def transcode(block: KvPayload, codec: str, *, use_lz4: bool = True) -> KvPayload:
    """`block` in `codec` (the same object when it already is); lossy codecs lose precision once more."""
    if block.codec == codec:
        return block
    return encode_kv(decode_kv(block), codec, sink_tokens=block.sink_tokens, use_lz4=use_lz4)
