"""KV block codecs: round trips, the documented error bounds, sinks, lz4 rule, payload layout."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import lz4.frame
import numpy as np
import pytest
import torch

from wicore import codecs
from wicore.codecs import (
    CodecName,
    EncodedBlock,
    codec_from_name,
    decode_block,
    encode_block,
    payload_nbytes,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _block(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _outlier_channel(shape: tuple[int, ...], seed: int = 0, heavy: bool = False) -> torch.Tensor:
    """Normal noise (log-normal-scaled if `heavy`) and, per head, one channel around 20, like real keys."""
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(shape, generator=gen)
    if heavy:
        kv *= torch.randn(shape, generator=gen).exp()
    kv[..., 3] += 20.0
    return kv


def _out_rounding(dtype: torch.dtype) -> float:
    """Relative bound of the final rounding to `dtype` (r in the module docstring)."""
    return 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps


def _group_bound(x: torch.Tensor, dim: int, bound_of_group: Callable[..., torch.Tensor]) -> torch.Tensor:
    """`bound_of_group(low, high, absmax)` for each value, over groups of 32 along `dim`."""
    bound = torch.empty_like(x)
    index: list[slice] = [slice(None)] * x.dim()
    for start in range(0, x.shape[dim], 32):
        index[dim] = slice(start, start + 32)
        group = x[tuple(index)]
        low, high = group.amin(dim, keepdim=True), group.amax(dim, keepdim=True)
        absmax = torch.maximum(low.abs(), high.abs())
        bound[tuple(index)] = bound_of_group(low, high, absmax).expand_as(group)
    return bound


def _q8_bound(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """absmax·(1 + 2⁻⁹)/254 + 2⁻²⁴ + absmax·eps(dtype), groups of 32 along head_dim."""
    r = _out_rounding(dtype)
    return _group_bound(x, -1, lambda low, high, absmax: absmax * ((1 + 2**-9) / 254 + r) + 2**-24)


def _q4_bound(x: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """range·(1 + 2⁻⁹)/30 + |min|·2⁻¹¹ + 2⁻²⁴ + absmax·eps(dtype), groups of 32 along `dim`."""
    r = _out_rounding(dtype)
    return _group_bound(
        x,
        dim,
        lambda low, high, absmax: (high - low) * (1 + 2**-9) / 30 + low.abs() * 2**-11 + 2**-24 + absmax * r,
    )


def _q4_bounds(kv: torch.Tensor, sinks: int, dtype: torch.dtype) -> torch.Tensor:
    """Bounds for the non-sink tokens: keys per channel over tokens, values per token along head_dim."""
    rest = kv[:, :, sinks:].float()
    return torch.stack([_q4_bound(rest[:, 0], 1, dtype), _q4_bound(rest[:, 1], 3, dtype)], 1)


def _error(kv: torch.Tensor, codec: CodecName, sinks: int = 0) -> torch.Tensor:
    out = decode_block(encode_block(kv, codec, sink_tokens=sinks))
    return (out.float() - kv.float()).abs()


# --- names, shapes, dtypes ---


def test_codec_from_name() -> None:
    assert [codec_from_name(n) for n in ("fp16", "bf16", "q8", "q4")] == list(CodecName)
    with pytest.raises(ValueError, match=r"unknown KV codec 'int3'.*fp16, bf16, q8, q4"):
        codec_from_name("int3")


@pytest.mark.parametrize("codec", list(CodecName))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 2, 16, 3, 64), (1, 2, 5, 2, 40), (1, 2, 40, 1, 7)])
def test_round_trip_keeps_dtype_shape_and_size(codec: CodecName, dtype: torch.dtype, shape: tuple) -> None:
    kv = _block(shape, dtype)
    sinks = 2 if codec in (CodecName.Q8, CodecName.Q4) else 0
    block = encode_block(kv, codec, sink_tokens=sinks, use_lz4=False)
    assert (block.codec, block.dtype, block.shape, block.sink_tokens) == (codec, str(dtype)[6:], shape, sinks)
    assert len(block.payload) == payload_nbytes(codec, shape, sinks)
    out = decode_block(block)
    assert out.dtype == dtype and out.shape == kv.shape and out.is_contiguous()
    assert (out.float() - kv.float()).abs().max() < 0.5  # the bounds are tested below


@pytest.mark.parametrize(
    ("codec", "dtype"), [(CodecName.FP16, torch.float16), (CodecName.BF16, torch.bfloat16)]
)
def test_casts_are_lossless_for_their_own_dtype(codec: CodecName, dtype: torch.dtype) -> None:
    kv = _outlier_channel((2, 2, 16, 2, 64), heavy=True).to(dtype)
    kv[0, 0, 0, 0, :4] = torch.tensor([0.0, -0.0, 1e-7, -65504.0])
    out = decode_block(encode_block(kv, codec))
    assert torch.equal(out.view(torch.int16), kv.view(torch.int16))  # bit-exact, signed zeros too


def test_casts_ignore_sink_tokens_and_round_float32() -> None:
    kv = _block((1, 2, 4, 1, 8))
    block = encode_block(kv, CodecName.FP16, sink_tokens=2)
    assert block.sink_tokens == 0
    assert torch.equal(decode_block(block), kv.half().float())


# --- error bounds ---


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("data", ["normal", "tiny", "heavy"])
def test_q8_error_bound(dtype: torch.dtype, data: str) -> None:
    shape = (2, 2, 16, 2, 72)  # 72 = two groups of 32 and a partial one
    kv = {
        "normal": _block(shape),
        "tiny": _block(shape) * 1e-5,
        "heavy": _outlier_channel(shape, heavy=True),
    }[data]
    kv = kv.to(dtype)
    err = _error(kv, CodecName.Q8)
    bound = _q8_bound(kv.float(), dtype)
    assert (err <= bound).all(), float((err / bound).max())
    if dtype == torch.float32 and data != "tiny":
        assert float((err / bound).max()) > 0.9  # the bound is nearly reached


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("data", ["normal", "tiny", "heavy"])
@pytest.mark.parametrize("tokens", [16, 40])  # 40: key chunks of 32 + 8 tokens
def test_q4_error_bound(dtype: torch.dtype, data: str, tokens: int) -> None:
    shape = (2, 2, tokens, 2, 40)
    kv = {
        "normal": _block(shape),
        "tiny": _block(shape) * 1e-5,
        "heavy": _outlier_channel(shape, heavy=True),
    }[data]
    kv = kv.to(dtype)
    err = _error(kv, CodecName.Q4)
    bound = _q4_bounds(kv, 0, dtype)
    assert (err <= bound).all(), float((err / bound).max())
    if dtype == torch.float32 and data != "tiny":
        assert float((err / bound).max()) > 0.9


def test_q4_per_channel_keys_beat_per_token_on_an_outlier_channel() -> None:
    data = _outlier_channel((2, 1, 16, 2, 64))
    kv = torch.cat([data, data], 1)  # the same numbers as keys (per channel) and values (per token)
    err = _error(kv, CodecName.Q4)
    normal_channels = [c for c in range(64) if c != 3]
    key_err = err[:, 0, ..., normal_channels].mean()
    value_err = err[:, 1, ..., normal_channels].mean()
    assert key_err < value_err / 3, (key_err, value_err)
    assert err[:, 0].mean() < err[:, 1].mean() / 3


@pytest.mark.parametrize("codec", [CodecName.Q8, CodecName.Q4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [16, 40])
def test_sinks_are_exact_to_fp16_and_left_out_of_the_groups(
    codec: CodecName, dtype: torch.dtype, tokens: int
) -> None:
    kv = _block((2, 2, tokens, 2, 64), dtype)
    kv[:, :, :4] *= 1000  # huge sinks would widen every group they joined
    out = decode_block(encode_block(kv, codec, sink_tokens=4))
    assert torch.equal(out[:, :, :4], kv[:, :, :4].half().to(dtype))
    err = (out[:, :, 4:].float() - kv[:, :, 4:].float()).abs()
    bound = _q8_bound(kv[:, :, 4:].float(), dtype) if codec is CodecName.Q8 else _q4_bounds(kv, 4, dtype)
    assert (err <= bound).all()


@pytest.mark.parametrize("codec", [CodecName.Q8, CodecName.Q4])
def test_all_sink_block_and_exact_groups(codec: CodecName) -> None:
    kv = _block((1, 2, 3, 1, 8), torch.float16)
    assert torch.equal(decode_block(encode_block(kv, codec, sink_tokens=3)), kv)
    # Zero groups are exact in both; constant groups in q4 (scale 0 codes, fp16 min).
    exact = torch.full((1, 2, 4, 1, 32), 0.75 if codec is CodecName.Q4 else 0.0)
    exact[0, 1, 2] = 0.0
    assert torch.equal(decode_block(encode_block(exact, codec)), exact)


@pytest.mark.parametrize("dim", [7, 40])
def test_odd_head_dim_pads_groups_but_stores_no_padding(dim: int) -> None:
    kv = _block((2, 2, 16, 3, dim))
    values, groups = 2 * 2 * 16 * 3 * dim, 2 * 2 * 16 * 3 * -(-dim // 32)
    q8 = encode_block(kv, CodecName.Q8, use_lz4=False)
    assert len(q8.payload) == values + 2 * groups  # int8 codes + one fp16 scale per group
    q4 = encode_block(kv, CodecName.Q4, use_lz4=False)
    key_groups = 2 * 3 * dim  # one per (layer, head, channel) over the 16 tokens
    assert len(q4.payload) == values // 2 + 2 * 2 * (key_groups + groups // 2)
    assert (_error(kv, CodecName.Q8) <= _q8_bound(kv, torch.float32)).all()
    assert (_error(kv, CodecName.Q4) <= _q4_bounds(kv, 0, torch.float32)).all()


@pytest.mark.parametrize("codec", list(CodecName))
def test_layer_slices_do_not_change_the_payload(monkeypatch: pytest.MonkeyPatch, codec: CodecName) -> None:
    kv = _outlier_channel((5, 2, 16, 2, 40), heavy=True)
    whole = encode_block(kv, codec, sink_tokens=3, use_lz4=False)
    monkeypatch.setattr(codecs, "_SLICE_VALUES", 2 * 16 * 2 * 40 * 2)  # two layers at a time
    sliced = encode_block(kv, codec, sink_tokens=3, use_lz4=False)
    assert sliced.payload == whole.payload
    assert torch.equal(decode_block(sliced), decode_block(whole))


def test_encode_leaves_the_input_alone_and_is_deterministic() -> None:
    kv = _outlier_channel((1, 2, 16, 2, 40), heavy=True)
    before = kv.clone()
    for codec in CodecName:
        first = encode_block(kv, codec, sink_tokens=0)
        assert first == encode_block(kv.clone(), codec, sink_tokens=0)
    assert torch.equal(kv, before)


# --- payload layout and framing ---


def test_q8_payload_layout() -> None:
    values = torch.arange(-16, 16, dtype=torch.float32) / 16  # one group, absmax 1
    kv = torch.stack([values, values * 2]).view(1, 2, 1, 1, 32)
    block = encode_block(kv, CodecName.Q8, use_lz4=False)
    scales = np.frombuffer(block.payload[:4], np.float16).astype(np.float32)  # then 64 codes
    codes = np.frombuffer(block.payload[4:], np.int8)
    assert np.all(scales >= [1 / 127, 2 / 127]) and np.all(scales <= np.array([1, 2]) * (1 + 2**-9) / 127)
    assert len(codes) == 64 and codes[0] == codes[32] == -127 and codes[16] == 0 and codes[17] == 8


def test_q4_payload_layout() -> None:
    ramp = torch.arange(16, dtype=torch.float32).view(1, 1, 16, 1, 1)  # min 0, max 15
    kv = torch.cat([ramp, ramp + 100], 1)  # keys: one group over 16 tokens; values: one per token
    block = encode_block(kv, CodecName.Q4, use_lz4=False)
    # k_meta: 1 scale, 1 min; v_meta: 16 scales, 16 mins; codes: 16 keys + 16 values, 2 per byte
    assert len(block.payload) == 2 * 2 + 2 * 2 * 16 + 16
    k_meta = np.frombuffer(block.payload[:4], np.float16)
    v_meta = np.frombuffer(block.payload[4:68], np.float16).reshape(2, 16)
    codes = np.frombuffer(block.payload[68:], np.uint8)
    assert 1 <= k_meta[0] <= 1 + 2**-9 and k_meta[1] == 0
    assert np.all(v_meta[1] == np.arange(100, 116))  # each value token is its own constant group
    assert codes.tolist() == [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE] + [0] * 8
    out = decode_block(block)
    assert torch.equal(out[:, 1], kv[:, 1])
    assert torch.allclose(out[:, 0], kv[:, 0], rtol=2**-9)  # code i decodes to i · (scale just above 1)


def _hash_block(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Deterministic values in [-8, 28) built with integer maths only (no RNG, no libm)."""
    n = torch.arange(torch.Size(shape).numel(), dtype=torch.int64)
    kv = ((n * 2654435761) % 65536).float().div_(4096).sub_(8).view(shape)
    kv[..., 3] += 20.0
    return kv.to(dtype)


@pytest.mark.parametrize(
    ("codec", "shape", "dtype", "sinks", "digest"),
    [
        (CodecName.Q8, (2, 2, 16, 3, 64), torch.float16, 0, "205d48fede780540"),
        (CodecName.Q4, (2, 2, 16, 3, 64), torch.float16, 0, "b6d900d2debbb7b4"),
        (CodecName.Q8, (2, 2, 16, 3, 64), torch.bfloat16, 4, "dce51134a1f9e190"),
        (CodecName.Q4, (2, 2, 16, 3, 64), torch.bfloat16, 4, "ccd7c22be94f8bf5"),
        (CodecName.Q8, (1, 2, 40, 2, 48), torch.float32, 3, "c027dde5d44fab07"),
        (CodecName.Q4, (1, 2, 40, 2, 48), torch.float32, 3, "6e390936937c2415"),
    ],
)
def test_payload_bytes_are_pinned(
    codec: CodecName, shape: tuple[int, ...], dtype: torch.dtype, sinks: int, digest: str
) -> None:
    """Stored blocks outlive the code: faster kernels must write exactly the same bytes
    (these digests come from the first, plain implementation)."""
    block = encode_block(_hash_block(shape, dtype), codec, sink_tokens=sinks, use_lz4=False)
    assert hashlib.sha256(block.payload).hexdigest()[:16] == digest


def test_lz4_is_kept_only_when_it_saves_a_sixty_fourth() -> None:
    noisy = encode_block(_block((2, 2, 16, 2, 64)), CodecName.Q8)
    assert not noisy.lz4 and len(noisy.payload) == payload_nbytes(CodecName.Q8, (2, 2, 16, 2, 64))
    zeros = torch.zeros(2, 2, 16, 2, 64, dtype=torch.float16)
    for codec in CodecName:
        block = encode_block(zeros, codec)
        assert block.lz4 and len(block.payload) < payload_nbytes(codec, zeros.shape) // 10
        assert torch.equal(decode_block(block), zeros)
    assert not encode_block(zeros, CodecName.Q8, use_lz4=False).lz4


@pytest.mark.parametrize(("saved", "kept"), [(100, True), (99, False)])
def test_lz4_threshold(monkeypatch: pytest.MonkeyPatch, saved: int, kept: bool) -> None:
    kv = torch.zeros(1, 2, 10, 1, 160, dtype=torch.float16)  # fp16 payload: 6400 bytes
    monkeypatch.setattr(lz4.frame, "compress", lambda raw: bytes(len(raw) - saved))
    assert encode_block(kv, CodecName.FP16).lz4 is kept


@pytest.mark.parametrize("codec", list(CodecName))
def test_wrong_payload_length_is_rejected(codec: CodecName) -> None:
    block = encode_block(_block((1, 2, 16, 2, 40)), codec, sink_tokens=0, use_lz4=False)
    for payload in (block.payload[:-1], block.payload + b"\0", b""):
        bad = EncodedBlock(codec, False, block.dtype, block.shape, block.sink_tokens, payload)
        with pytest.raises(ValueError, match=r"payload: .* bytes, expected"):
            decode_block(bad)
    framed = EncodedBlock(codec, True, block.dtype, block.shape, 0, lz4.frame.compress(block.payload[1:]))
    with pytest.raises(ValueError, match="expected"):
        decode_block(framed)
    with pytest.raises(ValueError, match="lz4"):
        decode_block(EncodedBlock(codec, True, block.dtype, block.shape, 0, b"not lz4"))


# --- validation ---


def test_invalid_inputs_are_rejected() -> None:
    kv = _block((1, 2, 4, 1, 8))
    with pytest.raises(ValueError, match="kv: expected a CPU tensor"):
        encode_block(kv.to(torch.int32), CodecName.Q8)
    with pytest.raises(ValueError, match="shape"):
        encode_block(kv.view(1, 4, 2, 1, 8), CodecName.Q8)
    with pytest.raises(ValueError, match="shape"):
        encode_block(kv[0], CodecName.Q8)
    with pytest.raises(ValueError, match=r"sink_tokens: 5 out of range 0\.\.4"):
        encode_block(kv, CodecName.Q4, sink_tokens=5)
    with pytest.raises(ValueError, match="dtype: unsupported 'int8'"):
        EncodedBlock(CodecName.Q8, False, "int8", (1, 2, 4, 1, 8), 0, b"")
    with pytest.raises(ValueError, match="sink_tokens"):
        EncodedBlock(CodecName.FP16, False, "float32", (1, 2, 4, 1, 8), 1, b"")
    with pytest.raises(ValueError, match="codec: expected a CodecName"):
        EncodedBlock("q8", False, "float32", (1, 2, 4, 1, 8), 0, b"")


@pytest.mark.parametrize(
    ("codec", "value", "sinks"),
    [
        (CodecName.Q8, float("nan"), 0),
        (CodecName.Q8, float("inf"), 0),
        (CodecName.Q8, 1e7, 0),  # scale 1e7/127 > 65504
        (CodecName.Q4, -7e4, 0),  # min < -65504
        (CodecName.Q4, 1e6, 0),  # scale 1e6/15 > 65504
        (CodecName.Q4, float("nan"), 0),
        (CodecName.Q8, 7e4, 1),  # in a sink token
    ],
)
def test_values_fp16_metadata_cannot_hold_are_rejected(codec: CodecName, value: float, sinks: int) -> None:
    kv = _block((1, 2, 4, 1, 8))
    kv[0, 1, 0, 0, 5] = value
    with pytest.raises(ValueError, match="must be finite and fit the"):
        encode_block(kv, codec, sink_tokens=sinks)


def test_large_values_within_fp16_metadata_are_kept() -> None:
    kv = _block((1, 2, 4, 1, 8))
    kv[0, :, 0, 0, 5] = 7e4  # beyond fp16, but the scales and mins fit
    for codec, bound in (
        (CodecName.Q8, _q8_bound(kv, torch.float32)),
        (CodecName.Q4, _q4_bounds(kv, 0, torch.float32)),
    ):
        assert (_error(kv, codec) <= bound).all()
