"""KV block codecs: how a block's K and V become payload bytes, and back.

A block is a CPU tensor [layers, 2, tokens, kv_heads, head_dim] (dim 1: 0 = keys,
1 = values) of float32, float16 or bfloat16 (`wicore.kv.block`); `decode(encode(kv, c))`
has kv's dtype and shape. Error bounds per value x (all fp32 maths; the groups are below):

    raw   the tensor's bytes   lossless
    fp16  cast to float16      lossless for fp16 input
    bf16  cast to bfloat16     lossless for bf16 input
    q8    int8 symmetric       |x - x̂| <= absmax·(1 + 2⁻⁹)/254 + 2⁻²⁴ + r
    q4    4-bit asymmetric     |x - x̂| <= range·(1 + 2⁻⁹)/30 + |min|·2⁻¹¹ + 2⁻²⁴ + r

absmax, range = max - min and min are those of x's group; r <= absmax·eps(dtype) is
the final rounding to the original dtype (0 for float32, ·2⁻¹⁰ fp16, ·2⁻⁷ bf16).
q8 groups: 32 consecutive values along head_dim of one (layer, k/v, token, head).
q4 keys: one (layer, head, channel) over the block's tokens (chunks of 32 tokens if
there are more); q4 values: like q8. Scales are fp16, rounded up (s >= span/levels,
so codes never clip); the q4 min is fp16 rounded to nearest (exact for fp16 and bf16
input; values below it clip to it, hence the |min| term). fp16 rather than fp32
metadata: 2 bytes per group, which matters for q4 keys in groups of 16 tokens.
A value that is not finite, or a group whose fp16 scale or min would overflow (q8:
absmax > 8.3e6; q4: |min| > 65504 or range > 9.8e5; sinks: |x| > 65504) raises
ValueError. q8 and q4 keep the first `sink_tokens` tokens (attention sinks) as fp16.
A head_dim not a multiple of 32 pads its last group by repeating the last channel
(padding is not stored); a token chunk pads with the last token.

Payload: the sections of `_layout`, each the little-endian bytes of a contiguous
layer-major tensor, fp16 ones first (aligned). S = sink_tokens, T = tokens - S,
Dg = ceil(head_dim / 32), G = ceil(T / 32):

    q8: sink f16[L,2,S,H,D] | scale f16[L,2,T,H,Dg] | codes i8[L,2,T,H,D]
    q4: sink f16[L,2,S,H,D] | k_meta f16[L,2,G,H,D] | v_meta f16[L,2,T,H,Dg]
        | codes u8[L,T·H·D]
        meta dim 1: 0 = scales, 1 = mins; codes: each layer's codes of [2,T,H,D]
        (keys then values), two per byte, the first in the low nibble

An lz4 frame of the payload is kept only when it saves at least 1/64 of it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import lz4.frame
import numpy as np
import torch

from wicore.kv.block import DTYPE_BYTES, KV_DIMS, Codec, EncodedBlock

if sys.byteorder != "little":  # the payload is the in-memory layout
    raise ImportError("wicore.kv.codecs needs a little-endian machine")

GROUP = 32
_LZ4_MIN_SAVING = 64  # keep lz4 only if it saves at least 1/64 of the payload
_F16_MAX = 65504.0
_SLICE_VALUES = 1 << 19  # values encoded or decoded at once (see _layer_slices)
_QUANTISED = (Codec.Q8, Codec.Q4)
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_BYTES}


def codec_from_name(name: str) -> Codec:
    """The codec called `name`: "raw", "fp16", "bf16", "q8" or "q4"."""
    try:
        return Codec(name)
    except ValueError:
        supported = ", ".join(c.value for c in Codec)
        raise ValueError(f"unknown KV codec {name!r} (supported: {supported})") from None


def encode(kv: torch.Tensor, codec: Codec, *, sink_tokens: int = 0, use_lz4: bool = True) -> EncodedBlock:
    """Encodes a block. `sink_tokens` applies to q8/q4 (fp16/bf16 store 0; raw records it for a
    later q8/q4 encoding). Raw is never lz4-framed.

    fp16/bf16 are plain casts: lossless only when kv already has that dtype (float32
    loses precision, and fp16 overflows to inf beyond ±65504).
    """
    dtype = str(kv.dtype).removeprefix("torch.")
    if dtype not in DTYPES or kv.device.type != "cpu":
        raise ValueError(f"kv: expected a CPU tensor of {', '.join(DTYPES)}, got {kv.dtype} on {kv.device}")
    shape = tuple(kv.shape)
    _check_shape(shape)
    sinks = sink_tokens if codec.keeps_sinks else 0
    _check_sinks(codec, sinks, shape[2])
    if codec is Codec.RAW:
        return EncodedBlock.of(
            codec, False, dtype, shape, sinks, kv.contiguous().view(torch.uint8).numpy().tobytes()
        )
    slices = _layer_slices(shape)
    parts = [_ENCODERS[codec](kv[layers] if len(slices) > 1 else kv, sinks) for layers in slices]
    layout = _layout(codec, shape, sinks)  # layer-major sections: each is its slices' bytes in turn
    raw = b"".join(_buffer(part[name]) for name, _, _ in layout for part in parts if part[name].numel())
    framed = lz4.frame.compress(raw) if use_lz4 else raw
    keep = use_lz4 and _LZ4_MIN_SAVING * (len(raw) - len(framed)) >= len(raw)
    return EncodedBlock.of(codec, keep, dtype, shape, sinks, framed if keep else raw)


def decode(block: EncodedBlock) -> torch.Tensor:
    """The block's tensor in its original dtype and shape; ValueError if the payload is malformed."""
    header = block.header
    dtype, shape = DTYPES[header.dtype], header.shape
    if header.codec is Codec.RAW:  # the header checked its length
        return torch.frombuffer(bytearray(block.payload), dtype=dtype).reshape(shape)
    # torch.frombuffer warns about read-only buffers such as bytes: hand it a private copy
    buf = _unframe(block.payload) if header.lz4 else bytearray(block.payload)
    layout = _layout(header.codec, shape, header.sink_tokens)
    if len(buf) != _nbytes(layout):
        raise ValueError(
            f"payload: {len(buf)} bytes, expected {_nbytes(layout)} for {header.codec.value} {shape}"
        )
    sections, offset = {}, 0
    for name, section_dtype, section_shape in layout:
        sections[name] = _section(buf, section_dtype, section_shape, offset)
        offset += sections[name].nbytes
    out = torch.empty(shape, dtype=dtype)
    decode_sections, slices = _DECODERS[header.codec], _layer_slices(shape)
    if len(slices) == 1:  # saves slicing every section
        decode_sections(sections, out)
    else:
        for layers in slices:
            decode_sections({name: t[layers] for name, t in sections.items()}, out[layers])
    return out


def transcode(block: EncodedBlock, codec: Codec, *, use_lz4: bool = True) -> EncodedBlock:
    """`block` in `codec` (the same object when it already is); lossy codecs lose precision once more."""
    if block.header.codec is codec:
        return block
    return encode(decode(block), codec, sink_tokens=block.header.sink_tokens, use_lz4=use_lz4)


def payload_nbytes(codec: Codec, shape: tuple[int, ...], sink_tokens: int = 0) -> int:
    """Length of the payload, before lz4, of a block of `shape`."""
    if codec is Codec.RAW:
        raise ValueError("payload_nbytes: raw depends on the dtype (BlockHeader.raw_bytes)")
    return _nbytes(_layout(codec, shape, sink_tokens if codec in _QUANTISED else 0))


# --- validation and payload layout ---

_Layout = list[tuple[str, torch.dtype, tuple[int, ...]]]  # (name, dtype, shape) per section
_Sections = dict[str, torch.Tensor]


def _check_shape(shape: tuple[int, ...]) -> None:
    if len(shape) != KV_DIMS or shape[1] != 2 or min(shape) < 1:
        raise ValueError(f"shape: expected [layers, 2, tokens, kv_heads, head_dim], got {list(shape)}")


def _check_sinks(codec: Codec, sinks: int, tokens: int) -> None:
    limit = tokens if codec.keeps_sinks else 0
    if not 0 <= sinks <= limit:
        raise ValueError(f"sink_tokens: {sinks} out of range 0..{limit} for {codec.value}")


def _layout(codec: Codec, shape: tuple[int, ...], sinks: int) -> _Layout:
    """The payload's sections (name, dtype, shape) in storage order; see the module docstring."""
    if codec in (Codec.FP16, Codec.BF16):
        return [("kv", torch.float16 if codec is Codec.FP16 else torch.bfloat16, shape)]
    layers, _, tokens, heads, dim = shape
    rest, dim_groups = tokens - sinks, _ceil_div(dim, GROUP)
    sink = ("sink", torch.float16, (layers, 2, sinks, heads, dim))
    if codec is Codec.Q8:
        scale = ("scale", torch.float16, (layers, 2, rest, heads, dim_groups))
        return [sink, scale, ("codes", torch.int8, (layers, 2, rest, heads, dim))]
    k_meta = ("k_meta", torch.float16, (layers, 2, _ceil_div(rest, GROUP), heads, dim))
    v_meta = ("v_meta", torch.float16, (layers, 2, rest, heads, dim_groups))
    return [sink, k_meta, v_meta, ("codes", torch.uint8, (layers, rest * heads * dim))]


def _layer_slices(shape: tuple[int, ...]) -> list[slice]:
    """Slices of layers worked on at once, keeping fp32 temporaries <= 2 MiB: glibc hands bigger
    freed buffers back to the OS and the next call page-faults them in (q8 encode up to 3x slower)."""
    step = max(1, _SLICE_VALUES // math.prod(shape[1:]))
    return [slice(start, start + step) for start in range(0, shape[0], step)]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _nbytes(layout: _Layout) -> int:
    return sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in layout)


def _unframe(payload: bytes) -> bytearray:
    try:
        return lz4.frame.decompress(payload, return_bytearray=True)
    except RuntimeError as exc:
        raise ValueError(f"payload: not a valid lz4 frame ({exc})") from None


def _buffer(t: torch.Tensor) -> memoryview:
    return t.contiguous().view(torch.uint8).numpy().data


def _section(buf: bytearray, dtype: torch.dtype, shape: tuple[int, ...], offset: int) -> torch.Tensor:
    count = math.prod(shape)
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype, count=count, offset=offset).view(shape)


# --- kernels: fp32 maths in whole-tensor torch ops ---
#
# Speed (one core): each torch call costs about a microsecond of dispatch, and a slice's
# fp32 temporaries outgrow L2 when several are live, so the kernels make one private fp32
# copy, work on it in place through views, and keep the calls few; padding and token
# chunks that are not views fall back to copies.


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` as `dtype`; fp16 <-> bf16 goes through fp32, which torch does several times faster."""
    if t.dtype != dtype and t.dtype.itemsize == 2 and dtype.itemsize == 2:
        t = t.float()
    return t.to(dtype)


def _fp16_meta(meta: torch.Tensor, what: str, *, signed: bool = True) -> torch.Tensor:
    """`meta` as fp16, or ValueError if fp16 cannot hold it (NaN fails the comparison too).

    `signed=False` promises meta >= 0 or NaN (scales), which saves taking the absolute value.
    """
    # numpy's reductions of small arrays dispatch faster than torch's; it has no bfloat16
    array = (meta if meta.dtype == torch.float32 else meta.float()).numpy()
    if array.size and not (np.abs(array) if signed else array).max() <= _F16_MAX:
        raise ValueError(f"kv: values must be finite and fit the {what} fp16 scales, mins (<= {_F16_MAX:g})")
    return _cast(meta, torch.float16)


def _scale_up(span: torch.Tensor, levels: int) -> torch.Tensor:
    """In place: span -> s such that span/levels <= fp16(s) <= span/levels·(1 + 1.5·2⁻¹⁰) + 1.5·2⁻²⁴.

    fp16 rounding moves s by at most 2⁻¹¹ relative (normal) or 2⁻²⁵ (subnormal); the nudges
    cover that, so codes never clip, and fp16(s) is never 0.
    """
    return span.mul_((1 + 2**-10) / levels).add_(2**-24)


def _split_last(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., Dg, GROUP], a view if D % GROUP == 0; else a copy whose partial last
    group repeats the last channel."""
    size = x.shape[-1]
    if size % GROUP:
        x = x.index_select(-1, torch.arange(_ceil_div(size, GROUP) * GROUP).clamp_(max=size - 1))
    return x.view(*x.shape[:-1], x.shape[-1] // GROUP, GROUP)


def _join_last(x: torch.Tensor, dim: int) -> torch.Tensor:
    """[..., Dg, GROUP] -> [..., dim], dropping padding."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * GROUP)[..., :dim]


def _token_groups(keys: torch.Tensor) -> torch.Tensor:
    """[L, T, H, D] -> [L, G, chunk, H, D]: all T tokens if T <= GROUP, else chunks of GROUP;
    a view unless the last chunk needs padding (then a copy that repeats the last token)."""
    layers, tokens, heads, dim = keys.shape
    if 0 < tokens <= GROUP:
        return keys.unsqueeze(1)
    padded = _ceil_div(tokens, GROUP) * GROUP
    if padded != tokens:
        keys = keys.index_select(1, torch.arange(padded).clamp_(max=tokens - 1))
    return keys.reshape(layers, padded // GROUP, GROUP, heads, dim)


def _per_token(meta: torch.Tensor, tokens: int) -> torch.Tensor:
    """Key metadata [L, 2, G, H, D] -> fp32, one row per token (broadcast when G == 1)."""
    meta = meta.float()
    return meta if meta.shape[2] <= 1 else meta.repeat_interleave(GROUP, 2)[:, :, :tokens]


def _sink_section(kv: torch.Tensor, sinks: int) -> torch.Tensor:
    if not sinks:
        return torch.empty(0, dtype=torch.float16)  # left out of the payload
    return _fp16_meta(kv[:, :, :sinks], "sink")


def _quant_sym8(x: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and fp16 scales of x [..., GROUP] (fp32, overwritten), a copy of `source`
    (a view of the same values): x ≈ code · scale, |code| <= 127.

    abs_ and a second copy from `source` beat keeping a second fp32 buffer for |x|.
    """
    scale = _fp16_meta(_scale_up(x.abs_().amax(-1), 127), "q8", signed=False)
    x.copy_(source).mul_(scale.float().reciprocal_().unsqueeze_(-1))
    return x.round_().to(torch.int8), scale


def _scale_asym4(x: torch.Tensor, dim: int) -> torch.Tensor:
    """In place: x -> (x - min) / scale per group along `dim` (< 0) of x (fp32); returns the fp16
    [scale, min] (dim 1) of each group. Rounding and clipping to 0..15 are left to the caller.

    x ≈ min + code · scale. The min is rounded to nearest, so a value may sit up to its
    rounding error outside [min, min + 15 · scale] and clip: the |min|·2⁻¹¹ of the bound.
    """
    low = x.amin(dim, keepdim=True)
    span = x.amax(dim, keepdim=True).sub_(low)
    meta = _fp16_meta(torch.stack([_scale_up(span, 15), low], 1), "q4")
    scale, low = meta.float().unbind(1)
    x.sub_(low).mul_(scale.reciprocal_())
    return meta.squeeze(dim)


def _pack4(codes: torch.Tensor) -> torch.Tensor:
    """An even number of codes 0..15 (int8) -> bytes, two per byte, the first in the low nibble.

    In numpy, whose integer ops and narrowing casts are about twice as fast as torch's here.
    """
    pairs = codes.contiguous().view(-1).numpy().view(np.uint16)  # first + 256 · second (little-endian)
    packed = pairs >> 4
    packed |= pairs  # the low byte is first + 16 · second
    return torch.from_numpy(packed.astype(np.uint8))


def _unpack4(packed: torch.Tensor) -> torch.Tensor:
    """Bytes -> codes (uint8), two per byte, the low nibble first (numpy, as `_pack4`)."""
    wide = packed.numpy().astype(np.uint16)  # first + 16 · second
    wide |= wide << 4
    wide &= 0x0F0F  # first + 256 · second
    return torch.from_numpy(wide.view(np.uint8))


def _encode_cast(dtype: torch.dtype) -> _Encoder:
    return lambda kv, sinks: {"kv": _cast(kv, dtype)}


def _encode_q8(kv: torch.Tensor, sinks: int) -> _Sections:
    rest = _split_last(kv[:, :, sinks:] if sinks else kv)
    codes, scale = _quant_sym8(torch.empty(rest.shape).copy_(rest), rest)
    return {"sink": _sink_section(kv, sinks), "scale": scale, "codes": _join_last(codes, kv.shape[-1])}


def _encode_q4(kv: torch.Tensor, sinks: int) -> _Sections:
    rest = kv[:, :, sinks:] if sinks else kv
    x = torch.empty(rest.shape).copy_(rest)  # [L, 2, T, H, D]: a private fp32 copy, scaled in place
    keys, values = x.unbind(1)
    k_groups, v_groups = _token_groups(keys), _split_last(values)
    k_meta, v_meta = _scale_asym4(k_groups, -3), _scale_asym4(v_groups, -1)
    if k_groups.data_ptr() != keys.data_ptr():  # padded copies: write the scaled values back
        keys.copy_(k_groups.flatten(1, 2)[:, : keys.shape[1]])
    if v_groups.data_ptr() != values.data_ptr():
        values.copy_(_join_last(v_groups, values.shape[-1]))
    codes = x.round_().clamp_(0, 15).to(torch.int8)
    return {"sink": _sink_section(kv, sinks), "k_meta": k_meta, "v_meta": v_meta, "codes": _pack4(codes)}


def _decode_cast(sections: _Sections, out: torch.Tensor) -> None:
    out.copy_(_cast(sections["kv"], out.dtype))


def _decode_q8(sections: _Sections, out: torch.Tensor) -> None:
    sinks = _copy_sinks(sections["sink"], out)
    rest, dim = (out[:, :, sinks:] if sinks else out), out.shape[-1]
    scale = sections["scale"].float().unsqueeze_(-1)
    if dim % GROUP:
        rest.copy_(_join_last(_split_last(sections["codes"]).float().mul_(scale), dim))
        return
    values = rest.copy_(sections["codes"]) if rest.dtype == torch.float32 else sections["codes"].float()
    _split_last(values).mul_(scale)
    if values is not rest:
        rest.copy_(values)


def _decode_q4(sections: _Sections, out: torch.Tensor) -> None:
    sinks = _copy_sinks(sections["sink"], out)
    layers, _, tokens, heads, dim = out.shape
    rest_tokens, rest = tokens - sinks, (out[:, :, sinks:] if sinks else out)
    codes = _unpack4(sections["codes"]).view(layers, 2, rest_tokens, heads, dim)
    values = rest.copy_(codes) if rest.dtype == torch.float32 else codes.float()  # scaled in place
    keys, vals = values.unbind(1)
    k_scale, k_min = _per_token(sections["k_meta"], rest_tokens).unbind(1)
    keys.mul_(k_scale).add_(k_min)
    v_scale, v_min = sections["v_meta"].float().unsqueeze_(-1).unbind(1)
    if dim % GROUP:
        vals.copy_(_join_last(_split_last(vals).mul_(v_scale).add_(v_min), dim))
    else:
        _split_last(vals).mul_(v_scale).add_(v_min)
    if values is not rest:
        rest.copy_(values)


def _copy_sinks(sink: torch.Tensor, out: torch.Tensor) -> int:
    """Writes the sink tokens into `out`; returns their count."""
    sinks = sink.shape[2]
    if sinks:
        out[:, :, :sinks] = _cast(sink, out.dtype)
    return sinks


_Encoder = Callable[[torch.Tensor, int], _Sections]
_ENCODERS: dict[Codec, _Encoder] = {
    Codec.FP16: _encode_cast(torch.float16),
    Codec.BF16: _encode_cast(torch.bfloat16),
    Codec.Q8: _encode_q8,
    Codec.Q4: _encode_q4,
}
_DECODERS: dict[Codec, Callable[[_Sections, torch.Tensor], None]] = {
    Codec.FP16: _decode_cast,
    Codec.BF16: _decode_cast,
    Codec.Q8: _decode_q8,
    Codec.Q4: _decode_q4,
}
