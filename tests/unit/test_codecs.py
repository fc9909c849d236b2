"""KV block codecs: round trips, the documented error bounds, sinks, lz4 rule, payload layout;
raw and transcode; BlockHeader and EncodedBlock validation."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import lz4.frame
import numpy as np
import pytest
import torch

from wicore.errors import InvalidRequest
from wicore.kv import codecs
from wicore.kv.block import BlockHeader, Codec, EncodedBlock
from wicore.kv.codecs import codec_from_name, decode, encode, payload_nbytes, transcode
from wicore.kv.hashing import payload_checksum

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LOSSY = [c for c in Codec if c is not Codec.RAW]  # the codecs with a payload layout of their own


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


def _error(kv: torch.Tensor, codec: Codec, sinks: int = 0) -> torch.Tensor:
    out = decode(encode(kv, codec, sink_tokens=sinks))
    return (out.float() - kv.float()).abs()


# --- names, shapes, dtypes ---


def test_codec_from_name() -> None:
    assert [codec_from_name(n) for n in ("raw", "fp16", "bf16", "q8", "q4")] == list(Codec)
    with pytest.raises(ValueError, match=r"unknown KV codec 'int3'.*raw, fp16, bf16, q8, q4"):
        codec_from_name("int3")


@pytest.mark.parametrize("codec", LOSSY)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 2, 16, 3, 64), (1, 2, 5, 2, 40), (1, 2, 40, 1, 7)])
def test_round_trip_keeps_dtype_shape_and_size(codec: Codec, dtype: torch.dtype, shape: tuple) -> None:
    kv = _block(shape, dtype)
    sinks = 2 if codec in (Codec.Q8, Codec.Q4) else 0
    block = encode(kv, codec, sink_tokens=sinks, use_lz4=False)
    header = block.header
    assert (header.codec, header.dtype, header.shape, header.sink_tokens) == (codec, str(dtype)[6:], shape,
                                                                              sinks)  # fmt: skip
    assert len(block.payload) == header.payload_bytes == payload_nbytes(codec, shape, sinks)
    assert block.verify() and header.checksum == payload_checksum(block.payload)
    out = decode(block)
    assert out.dtype == dtype and out.shape == kv.shape and out.is_contiguous()
    assert (out.float() - kv.float()).abs().max() < 0.5  # the bounds are tested below


@pytest.mark.parametrize(("codec", "dtype"), [(Codec.FP16, torch.float16), (Codec.BF16, torch.bfloat16)])
def test_casts_are_lossless_for_their_own_dtype(codec: Codec, dtype: torch.dtype) -> None:
    kv = _outlier_channel((2, 2, 16, 2, 64), heavy=True).to(dtype)
    kv[0, 0, 0, 0, :4] = torch.tensor([0.0, -0.0, 1e-7, -65504.0])
    out = decode(encode(kv, codec))
    assert torch.equal(out.view(torch.int16), kv.view(torch.int16))  # bit-exact, signed zeros too


def test_casts_ignore_sink_tokens_and_round_float32() -> None:
    kv = _block((1, 2, 4, 1, 8))
    block = encode(kv, Codec.FP16, sink_tokens=2)
    assert block.header.sink_tokens == 0
    assert torch.equal(decode(block), kv.half().float())


# --- raw and transcode ---


@pytest.mark.parametrize("dtype", DTYPES)
def test_raw_is_lossless_keeps_sink_tokens_and_is_never_lz4(dtype: torch.dtype) -> None:
    kv = _outlier_channel((2, 2, 16, 3, 40), heavy=True).to(dtype)
    kv[0, 0, 0, 0, :4] = torch.tensor([-0.0, float("inf"), float("nan"), 1e-30])  # kept as they are
    block = encode(kv, Codec.RAW, sink_tokens=4)
    header = block.header
    assert (header.codec, header.lz4, header.dtype, header.shape, header.sink_tokens) == (
        Codec.RAW, False, str(dtype)[6:], tuple(kv.shape), 4,
    )  # fmt: skip
    assert block.nbytes == header.raw_bytes == kv.numel() * kv.element_size() and block.verify()
    out = decode(block)
    assert out.dtype == dtype and out.shape == kv.shape and out.is_contiguous()
    assert torch.equal(out.view(torch.uint8), kv.view(torch.uint8))  # bit-exact: signed zeros, inf, NaN
    zeros = torch.zeros(2, 2, 16, 3, 40, dtype=dtype)
    assert not encode(zeros, Codec.RAW, use_lz4=True).header.lz4  # however well it would compress
    with pytest.raises(ValueError, match="payload_nbytes: raw depends on the dtype"):
        payload_nbytes(Codec.RAW, tuple(kv.shape))


def test_transcode_is_the_same_object_for_the_same_codec_and_raw_to_q4_keeps_sinks() -> None:
    kv = _block((2, 2, 16, 2, 64), torch.bfloat16)
    kv[:, :, :4] *= 1000  # sinks that would widen every group they joined
    raw = encode(kv, Codec.RAW, sink_tokens=4)
    assert transcode(raw, Codec.RAW) is raw
    q4 = transcode(raw, Codec.Q4)
    assert transcode(q4, Codec.Q4) is q4
    assert (q4.header.codec, q4.header.dtype, q4.header.sink_tokens) == (Codec.Q4, "bfloat16", 4)
    assert q4 == encode(kv, Codec.Q4, sink_tokens=4)  # as if the worker had encoded q4 itself
    out = decode(q4)
    assert torch.equal(out[:, :, :4], kv[:, :, :4].half().to(torch.bfloat16))  # sinks exact to fp16
    back = transcode(q4, Codec.RAW)
    assert back.header.sink_tokens == 4 and torch.equal(decode(back), out)  # raw keeps what q4 gave
    fp16 = transcode(raw, Codec.FP16, use_lz4=False)
    assert fp16 == encode(kv, Codec.FP16, use_lz4=False) and fp16.header.sink_tokens == 0


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
    err = _error(kv, Codec.Q8)
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
    err = _error(kv, Codec.Q4)
    bound = _q4_bounds(kv, 0, dtype)
    assert (err <= bound).all(), float((err / bound).max())
    if dtype == torch.float32 and data != "tiny":
        assert float((err / bound).max()) > 0.9


def test_q4_per_channel_keys_beat_per_token_on_an_outlier_channel() -> None:
    data = _outlier_channel((2, 1, 16, 2, 64))
    kv = torch.cat([data, data], 1)  # the same numbers as keys (per channel) and values (per token)
    err = _error(kv, Codec.Q4)
    normal_channels = [c for c in range(64) if c != 3]
    key_err = err[:, 0, ..., normal_channels].mean()
    value_err = err[:, 1, ..., normal_channels].mean()
    assert key_err < value_err / 3, (key_err, value_err)
    assert err[:, 0].mean() < err[:, 1].mean() / 3


@pytest.mark.parametrize("codec", [Codec.Q8, Codec.Q4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [16, 40])
def test_sinks_are_exact_to_fp16_and_left_out_of_the_groups(
    codec: Codec, dtype: torch.dtype, tokens: int
) -> None:
    kv = _block((2, 2, tokens, 2, 64), dtype)
    kv[:, :, :4] *= 1000  # huge sinks would widen every group they joined
    out = decode(encode(kv, codec, sink_tokens=4))
    assert torch.equal(out[:, :, :4], kv[:, :, :4].half().to(dtype))
    err = (out[:, :, 4:].float() - kv[:, :, 4:].float()).abs()
    bound = _q8_bound(kv[:, :, 4:].float(), dtype) if codec is Codec.Q8 else _q4_bounds(kv, 4, dtype)
    assert (err <= bound).all()


@pytest.mark.parametrize("codec", [Codec.Q8, Codec.Q4])
def test_all_sink_block_and_exact_groups(codec: Codec) -> None:
    kv = _block((1, 2, 3, 1, 8), torch.float16)
    assert torch.equal(decode(encode(kv, codec, sink_tokens=3)), kv)
    # Zero groups are exact in both; constant groups in q4 (scale 0 codes, fp16 min).
    exact = torch.full((1, 2, 4, 1, 32), 0.75 if codec is Codec.Q4 else 0.0)
    exact[0, 1, 2] = 0.0
    assert torch.equal(decode(encode(exact, codec)), exact)


@pytest.mark.parametrize("dim", [7, 40])
def test_odd_head_dim_pads_groups_but_stores_no_padding(dim: int) -> None:
    kv = _block((2, 2, 16, 3, dim))
    values, groups = 2 * 2 * 16 * 3 * dim, 2 * 2 * 16 * 3 * -(-dim // 32)
    q8 = encode(kv, Codec.Q8, use_lz4=False)
    assert len(q8.payload) == values + 2 * groups  # int8 codes + one fp16 scale per group
    q4 = encode(kv, Codec.Q4, use_lz4=False)
    key_groups = 2 * 3 * dim  # one per (layer, head, channel) over the 16 tokens
    assert len(q4.payload) == values // 2 + 2 * 2 * (key_groups + groups // 2)
    assert (_error(kv, Codec.Q8) <= _q8_bound(kv, torch.float32)).all()
    assert (_error(kv, Codec.Q4) <= _q4_bounds(kv, 0, torch.float32)).all()


@pytest.mark.parametrize("codec", LOSSY)
def test_layer_slices_do_not_change_the_payload(monkeypatch: pytest.MonkeyPatch, codec: Codec) -> None:
    kv = _outlier_channel((5, 2, 16, 2, 40), heavy=True)
    whole = encode(kv, codec, sink_tokens=3, use_lz4=False)
    monkeypatch.setattr(codecs, "_SLICE_VALUES", 2 * 16 * 2 * 40 * 2)  # two layers at a time
    sliced = encode(kv, codec, sink_tokens=3, use_lz4=False)
    assert sliced.payload == whole.payload
    assert torch.equal(decode(sliced), decode(whole))


def test_encode_leaves_the_input_alone_and_is_deterministic() -> None:
    kv = _outlier_channel((1, 2, 16, 2, 40), heavy=True)
    before = kv.clone()
    for codec in Codec:
        first = encode(kv, codec, sink_tokens=0)
        assert first == encode(kv.clone(), codec, sink_tokens=0)
    assert torch.equal(kv, before)


# --- payload layout and framing ---


def test_q8_payload_layout() -> None:
    values = torch.arange(-16, 16, dtype=torch.float32) / 16  # one group, absmax 1
    kv = torch.stack([values, values * 2]).view(1, 2, 1, 1, 32)
    block = encode(kv, Codec.Q8, use_lz4=False)
    scales = np.frombuffer(block.payload[:4], np.float16).astype(np.float32)  # then 64 codes
    codes = np.frombuffer(block.payload[4:], np.int8)
    assert np.all(scales >= [1 / 127, 2 / 127]) and np.all(scales <= np.array([1, 2]) * (1 + 2**-9) / 127)
    assert len(codes) == 64 and codes[0] == codes[32] == -127 and codes[16] == 0 and codes[17] == 8


def test_q4_payload_layout() -> None:
    ramp = torch.arange(16, dtype=torch.float32).view(1, 1, 16, 1, 1)  # min 0, max 15
    kv = torch.cat([ramp, ramp + 100], 1)  # keys: one group over 16 tokens; values: one per token
    block = encode(kv, Codec.Q4, use_lz4=False)
    # k_meta: 1 scale, 1 min; v_meta: 16 scales, 16 mins; codes: 16 keys + 16 values, 2 per byte
    assert len(block.payload) == 2 * 2 + 2 * 2 * 16 + 16
    k_meta = np.frombuffer(block.payload[:4], np.float16)
    v_meta = np.frombuffer(block.payload[4:68], np.float16).reshape(2, 16)
    codes = np.frombuffer(block.payload[68:], np.uint8)
    assert 1 <= k_meta[0] <= 1 + 2**-9 and k_meta[1] == 0
    assert np.all(v_meta[1] == np.arange(100, 116))  # each value token is its own constant group
    assert codes.tolist() == [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE] + [0] * 8
    out = decode(block)
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
        (Codec.Q8, (2, 2, 16, 3, 64), torch.float16, 0, "205d48fede780540"),
        (Codec.Q4, (2, 2, 16, 3, 64), torch.float16, 0, "b6d900d2debbb7b4"),
        (Codec.Q8, (2, 2, 16, 3, 64), torch.bfloat16, 4, "dce51134a1f9e190"),
        (Codec.Q4, (2, 2, 16, 3, 64), torch.bfloat16, 4, "ccd7c22be94f8bf5"),
        (Codec.Q8, (1, 2, 40, 2, 48), torch.float32, 3, "c027dde5d44fab07"),
        (Codec.Q4, (1, 2, 40, 2, 48), torch.float32, 3, "6e390936937c2415"),
    ],
)
def test_payload_bytes_are_pinned(
    codec: Codec, shape: tuple[int, ...], dtype: torch.dtype, sinks: int, digest: str
) -> None:
    """Stored blocks outlive the code: faster kernels must write exactly the same bytes
    (these digests come from the first, plain implementation)."""
    block = encode(_hash_block(shape, dtype), codec, sink_tokens=sinks, use_lz4=False)
    assert hashlib.sha256(block.payload).hexdigest()[:16] == digest


def test_lz4_is_kept_only_when_it_saves_a_sixty_fourth() -> None:
    noisy = encode(_block((2, 2, 16, 2, 64)), Codec.Q8)
    assert not noisy.header.lz4 and len(noisy.payload) == payload_nbytes(Codec.Q8, (2, 2, 16, 2, 64))
    zeros = torch.zeros(2, 2, 16, 2, 64, dtype=torch.float16)
    for codec in LOSSY:
        block = encode(zeros, codec)
        assert block.header.lz4 and len(block.payload) < payload_nbytes(codec, tuple(zeros.shape)) // 10
        assert torch.equal(decode(block), zeros)
    assert not encode(zeros, Codec.Q8, use_lz4=False).header.lz4


@pytest.mark.parametrize(("saved", "kept"), [(100, True), (99, False)])
def test_lz4_threshold(monkeypatch: pytest.MonkeyPatch, saved: int, kept: bool) -> None:
    kv = torch.zeros(1, 2, 10, 1, 160, dtype=torch.float16)  # fp16 payload: 6400 bytes
    monkeypatch.setattr(lz4.frame, "compress", lambda raw: bytes(len(raw) - saved))
    assert encode(kv, Codec.FP16).header.lz4 is kept


@pytest.mark.parametrize("codec", LOSSY)
def test_wrong_payload_length_is_rejected(codec: Codec) -> None:
    block = encode(_block((1, 2, 16, 2, 40)), codec, sink_tokens=0, use_lz4=False)
    dtype, shape = block.header.dtype, block.header.shape
    for payload in (block.payload[:-1], block.payload + b"\0"):
        bad = EncodedBlock.of(codec, False, dtype, shape, 0, payload)
        with pytest.raises(ValueError, match=r"payload: .* bytes, expected"):
            decode(bad)
    with pytest.raises(InvalidRequest, match="payload_bytes: must be positive"):  # the header's own check
        EncodedBlock.of(codec, False, dtype, shape, 0, b"")
    framed = EncodedBlock.of(codec, True, dtype, shape, 0, lz4.frame.compress(block.payload[1:]))
    with pytest.raises(ValueError, match="expected"):
        decode(framed)
    with pytest.raises(ValueError, match="lz4"):
        decode(EncodedBlock.of(codec, True, dtype, shape, 0, b"not lz4"))


# --- validation ---


def test_invalid_inputs_are_rejected() -> None:
    kv = _block((1, 2, 4, 1, 8))
    with pytest.raises(ValueError, match="kv: expected a CPU tensor"):
        encode(kv.to(torch.int32), Codec.Q8)
    with pytest.raises(ValueError, match="shape"):
        encode(kv.view(1, 4, 2, 1, 8), Codec.Q8)
    with pytest.raises(ValueError, match="shape"):
        encode(kv[0], Codec.Q8)
    with pytest.raises(ValueError, match=r"sink_tokens: 5 out of range 0\.\.4"):
        encode(kv, Codec.Q4, sink_tokens=5)
    with pytest.raises(ValueError, match=r"sink_tokens: 5 out of range 0\.\.4 for raw"):
        encode(kv, Codec.RAW, sink_tokens=5)
    # An encoded block's fields are BlockHeader's to check (InvalidRequest naming the field)
    with pytest.raises(InvalidRequest, match="dtype: expected one of float32, float16, bfloat16, got 'int8'"):
        EncodedBlock.of(Codec.Q8, False, "int8", (1, 2, 4, 1, 8), 0, b"x")
    with pytest.raises(
        InvalidRequest, match=r"sink_tokens: 1 out of range 0\.\.0 for fp16 \[1, 2, 4, 1, 8\]"
    ):
        EncodedBlock.of(Codec.FP16, False, "float32", (1, 2, 4, 1, 8), 1, b"x")
    with pytest.raises(InvalidRequest, match=r"sink_tokens: 5 out of range 0\.\.4 for q8 \[1, 2, 4, 1, 8\]"):
        EncodedBlock.of(Codec.Q8, False, "float32", (1, 2, 4, 1, 8), 5, b"x")
    with pytest.raises(InvalidRequest, match="codec: expected a Codec"):
        EncodedBlock.of("q8", False, "float32", (1, 2, 4, 1, 8), 0, b"x")


def _header(**change: object) -> BlockHeader:
    """A valid q4 header of a float16 [1, 2, 4, 1, 8] block (raw: 128 bytes), with `change` applied."""
    fields: dict[str, object] = {"codec": Codec.Q4, "lz4": False, "dtype": "float16",
                                 "shape": (1, 2, 4, 1, 8), "sink_tokens": 2, "payload_bytes": 10,
                                 "checksum": "ab" * 16}  # fmt: skip
    return BlockHeader(**{**fields, **change})


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("codec", {"codec": "q4"}),
        ("dtype", {"dtype": "int8"}),
        ("dtype", {"dtype": "torch.float16"}),
        ("shape", {"shape": (1, 2, 4, 8)}),  # four dims
        ("shape", {"shape": (1, 3, 4, 1, 8)}),  # dim 1 is not K, V
        ("shape", {"shape": (1, 2, 0, 1, 8)}),
        ("shape", {"shape": (1, 2, 4, 1, 1 << 32)}),  # beyond u32 (the file format's)
        ("sink_tokens", {"sink_tokens": -1}),
        ("sink_tokens", {"sink_tokens": 5}),  # more than the block's 4 tokens
        ("sink_tokens", {"codec": Codec.BF16, "sink_tokens": 1}),  # casts keep no sinks
        ("payload_bytes", {"payload_bytes": 0}),
        ("payload_bytes", {"codec": Codec.RAW, "payload_bytes": 127}),  # raw: the tensor's 128 bytes
        ("payload_bytes", {"codec": Codec.RAW, "payload_bytes": 128, "lz4": True}),  # raw is never lz4
        ("checksum", {"checksum": "AB" * 16}),
        ("checksum", {"checksum": "ab" * 15}),
    ],
)
def test_block_header_names_the_bad_field(field: str, change: dict[str, object]) -> None:
    with pytest.raises(InvalidRequest, match=f"^{field}: ") as exc:
        _header(**change)
    assert exc.value.field == field


def test_block_header_accepts_its_edge_cases() -> None:
    assert _header().raw_bytes == 128
    raw = _header(codec=Codec.RAW, payload_bytes=128, sink_tokens=4)  # raw records sinks, up to all tokens
    assert raw.payload_bytes == raw.raw_bytes
    assert _header(codec=Codec.FP16, sink_tokens=0, lz4=True).lz4
    assert _header(shape=(1, 2, 4, 1, (1 << 32) - 1)).shape[-1] == 0xFFFFFFFF


def test_encoded_block_payload_must_match_its_header() -> None:
    kv = _block((1, 2, 4, 1, 8))
    block = encode(kv, Codec.Q8, use_lz4=False)
    for payload in (block.payload[:-1], block.payload + b"\0"):
        with pytest.raises(InvalidRequest, match=r"^payload: \d+ bytes, its header says \d+") as exc:
            EncodedBlock(block.header, payload)
        assert exc.value.field == "payload"
    raw = encode(kv, Codec.RAW).payload
    with pytest.raises(InvalidRequest, match=r"^payload_bytes: raw float32 \[1, 2, 4, 1, 8\]: 256 bytes"):
        EncodedBlock.of(Codec.RAW, False, "float32", (1, 2, 4, 1, 8), 0, raw[:-4])
    assert block.verify() and block.nbytes == len(block.payload) == block.header.payload_bytes
    tampered = EncodedBlock(block.header, bytes([block.payload[0] ^ 1]) + block.payload[1:])
    assert not tampered.verify()  # the checksum travels with the bytes: any hop can refuse them


@pytest.mark.parametrize(
    ("codec", "value", "sinks"),
    [
        (Codec.Q8, float("nan"), 0),
        (Codec.Q8, float("inf"), 0),
        (Codec.Q8, 1e7, 0),  # scale 1e7/127 > 65504
        (Codec.Q4, -7e4, 0),  # min < -65504
        (Codec.Q4, 1e6, 0),  # scale 1e6/15 > 65504
        (Codec.Q4, float("nan"), 0),
        (Codec.Q8, 7e4, 1),  # in a sink token
    ],
)
def test_values_fp16_metadata_cannot_hold_are_rejected(codec: Codec, value: float, sinks: int) -> None:
    kv = _block((1, 2, 4, 1, 8))
    kv[0, 1, 0, 0, 5] = value
    with pytest.raises(ValueError, match="must be finite and fit the"):
        encode(kv, codec, sink_tokens=sinks)


def test_large_values_within_fp16_metadata_are_kept() -> None:
    kv = _block((1, 2, 4, 1, 8))
    kv[0, :, 0, 0, 5] = 7e4  # beyond fp16, but the scales and mins fit
    for codec, bound in (
        (Codec.Q8, _q8_bound(kv, torch.float32)),
        (Codec.Q4, _q4_bounds(kv, 0, torch.float32)),
    ):
        assert (_error(kv, codec) <= bound).all()
