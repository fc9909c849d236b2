"""The native kernels (worker/native.py): the paged decode kernel (csrc/paged_attention.c)
against attention computed in torch over the same keys, for the shapes and dtypes the engine
gives it; the residual-add + RMS norm kernel (csrc/norm.c) against transformers' arithmetic,
and where the Decoder uses it; the build cache; the prebuilt kernels a machine without a compiler
loads; and what the worker does where nothing builds or is prebuilt.
(The few-rows linear kernel is tested with the other CPU kernels, test_cpu_linear.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from wicore.config import AttentionBackend, load_config
from wicore.errors import ConfigError
from wicore.worker import native
from wicore.worker.app import load_model
from wicore.worker.cascade import PrefixTables
from wicore.worker.decoder import Decoder, rms_norm
from wicore.worker.model_runner import ModelRunner

from tiny_models import save_tiny


def tiny_model(family: str, path: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(save_tiny(family, path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> native.PagedDecode:
    built = native.decode_kernel(str(tmp_path_factory.mktemp("kernels")))
    assert built is not None, "the kernel must build on the test machine (cc is there)"
    return built


def reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    tables: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    block_size: int,
    window: int | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row by row in float64: the keys at positions [start, end) gathered by slot, then softmax."""
    rows, heads = query.shape[:2]
    group = heads // keys.shape[1]
    outs, lses = [], []
    for r in range(rows):
        start, end = int(starts[r]), int(ends[r])
        if window:
            start = max(start, end - window)
        positions = torch.arange(start, end)
        slots = tables[r][positions // block_size] * block_size + positions % block_size
        k = keys[slots].double().repeat_interleave(group, 1)  # [L, H, D]
        v = values[slots].double().repeat_interleave(group, 1)
        scores = torch.einsum("hd,lhd->hl", query[r].double(), k) * scale
        lses.append(torch.logsumexp(scores, -1))
        outs.append(torch.einsum("hl,lhd->hd", torch.softmax(scores, -1), v))
    return torch.stack(outs), torch.stack(lses)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block_size"),
    [(4, 2, 16, 4), (9, 3, 64, 16), (8, 8, 32, 32), (32, 8, 128, 16), (16, 1, 256, 8)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 13])
def test_kernel_matches_attention_over_the_gathered_keys(
    kernel: native.PagedDecode,
    heads: int,
    kv_heads: int,
    dim: int,
    block_size: int,
    dtype: torch.dtype,
    window: int | None,
) -> None:
    generator = torch.Generator().manual_seed(heads * dim + block_size)
    rows, blocks, per_row = 5, 64, 9
    keys = torch.randn(blocks * block_size, kv_heads, dim, generator=generator).to(dtype)
    values = torch.randn(blocks * block_size, kv_heads, dim, generator=generator).to(dtype)
    tables = torch.randperm(blocks, generator=generator)[: rows * per_row].view(rows, per_row).contiguous()
    # Lengths from one key to every slot of the table; some rows start after a (shared) prefix.
    ends = torch.tensor([1, block_size + 1, 3 * block_size - 1, per_row * block_size, 2 * block_size])
    starts = torch.tensor([0, 0, block_size, 2 * block_size, block_size + 3])
    query = torch.randn(rows, heads, dim, generator=generator).to(dtype)
    scale = dim**-0.5
    out, lse = kernel(query, keys, values, tables, starts, ends, block_size, window, scale)
    want, want_lse = reference(query, keys, values, tables, starts, ends, block_size, window, scale)
    assert out.dtype == dtype and out.shape == (rows, heads, dim)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output is rounded to bf16
    assert torch.allclose(out.double(), want, atol=tolerance, rtol=tolerance)
    assert torch.allclose(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 100])
def test_long_rows_are_attended_part_by_part(
    kernel: native.PagedDecode, dtype: torch.dtype, window: int | None
) -> None:
    """Rows longer than the kernel's part of keys (its softmax is folded part by part), ranges that
    start and end inside blocks, and a one-row call split over the KV heads."""
    generator = torch.Generator().manual_seed(7)
    heads, kv_heads, dim, block_size, per_row = 9, 3, 64, 16, 48
    rows = 3
    keys = torch.randn(rows * per_row * block_size, kv_heads, dim, generator=generator).to(dtype)
    values = torch.randn(rows * per_row * block_size, kv_heads, dim, generator=generator).to(dtype)
    tables = torch.randperm(rows * per_row, generator=generator).view(rows, per_row).contiguous()
    starts, ends = torch.tensor([0, 17, 200]), torch.tensor([300, 129, 767])
    query = torch.randn(rows, heads, dim, generator=generator).to(dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for r in (slice(0, 3), slice(2, 3)):
        args = (query[r], keys, values, tables[r].contiguous(), starts[r], ends[r], block_size, window, 0.125)
        out, lse = kernel(*args)
        want, want_lse = reference(*args)
        assert torch.allclose(out.double(), want, atol=tolerance, rtol=tolerance)
        assert torch.allclose(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block_size"),
    [(4, 2, 16, 4), (9, 3, 64, 16), (32, 8, 128, 16), (16, 1, 256, 8)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 40])
def test_shared_prefixes_merge_into_each_rows_own_keys(
    kernel: native.PagedDecode,
    heads: int,
    kv_heads: int,
    dim: int,
    block_size: int,
    dtype: torch.dtype,
    window: int | None,
) -> None:
    """Own keys through the per-row kernel, then each shared prefix attended once for its members and
    merged in: the same as every row attending its whole context. A short prefix shared by more
    (member, query head) rows than one task takes; a long one, of a few rows, whose keys are split
    over threads and end mid-chunk; both in scattered blocks; rows that share nothing; a window that
    hides part of a prefix or all of it."""
    generator = torch.Generator().manual_seed(heads * dim + block_size)
    many, few, alone, own_blocks = 70, 2, 3, 3
    rows = many + few + alone
    short_blocks, long_blocks = 3, 300 // block_size + 1
    total = long_blocks + short_blocks + rows * own_blocks
    order = torch.randperm(total, generator=generator).tolist()
    short_prefix, order = order[:short_blocks], order[short_blocks:]
    long_prefix, order = order[:long_blocks], order[long_blocks:]
    keys = torch.randn(total * block_size, kv_heads, dim, generator=generator).to(dtype)
    values = torch.randn(total * block_size, kv_heads, dim, generator=generator).to(dtype)
    tables = torch.zeros(rows, long_blocks + own_blocks, dtype=torch.long)
    starts, ends = torch.zeros(rows, dtype=torch.long), torch.zeros(rows, dtype=torch.long)
    for r in range(rows):
        prefix = short_prefix if r < many else long_prefix if r < rows - alone else []
        own, order = order[:own_blocks], order[own_blocks:]
        tables[r, : len(prefix) + own_blocks] = torch.tensor(prefix + own)
        starts[r] = len(prefix) * block_size
        ends[r] = starts[r] + 1 + torch.randint(own_blocks * block_size, (1,), generator=generator)
    prefixes = PrefixTables.of([(range(many), short_prefix), (range(many, rows - alone), long_prefix)])
    assert prefixes is not None
    query = torch.randn(rows, heads, dim, generator=generator)
    scale = dim**-0.5
    threads = torch.get_num_threads()
    torch.set_num_threads(4)  # the long prefix's few rows: its keys split over 4 threads' tasks
    try:
        out, lse = kernel(query, keys, values, tables, starts, ends, block_size, window, scale)
        kernel.merge_prefixes(query, out, lse, prefixes, keys, values, ends, block_size, window, scale)
    finally:
        torch.set_num_threads(threads)
    whole = torch.zeros(rows, dtype=torch.long)
    want, want_lse = reference(query, keys, values, tables, whole, ends, block_size, window, scale)
    assert torch.allclose(out.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


def test_an_empty_range_weighs_nothing(kernel: native.PagedDecode) -> None:
    keys = torch.randn(32, 1, 16)
    tables = torch.arange(2)[None].contiguous()
    start = torch.tensor([5])
    out, lse = kernel(torch.randn(1, 2, 16), keys, keys, tables, start, start.clone(), 16, None, 0.25)
    assert torch.equal(out, torch.zeros(1, 2, 16))
    assert torch.isneginf(lse).all()


def test_shapes_it_does_not_take_are_refused(kernel: native.PagedDecode) -> None:
    assert not native.PagedDecode.supports(4, 2, 24, torch.float32)  # head dim not a multiple of 16
    assert not native.PagedDecode.supports(34, 2, 64, torch.float32)  # 17 query heads per KV head
    assert not native.PagedDecode.supports(4, 2, 64, torch.float16)
    assert not native.PagedDecode.supports(512, 64, 64, torch.float32)  # 512 query heads
    # A head dim the kernels' vectors do not divide (8 floats without AVX-512, 16 with): refused by both.
    keys = torch.randn(16, 2, 20)
    one = torch.ones(1, dtype=torch.long)
    query = torch.randn(1, 4, 20)
    with pytest.raises(ValueError, match="unsupported shape"):
        kernel(query, keys, keys, one[None].contiguous() * 0, one * 0, one, 16, None, 1.0)
    prefixes = PrefixTables.of([([0], [0])])
    assert prefixes is not None
    lse = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="unsupported shape"):
        kernel.merge_prefixes(query, query.clone(), lse, prefixes, keys, keys, one * 17, 16, None, 1.0)


def test_the_build_is_cached_per_machine(tmp_path: Path) -> None:
    first = native.build(tmp_path)
    built_at = first.stat().st_mtime_ns
    assert native.build(tmp_path) == first and first.stat().st_mtime_ns == built_at
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no scratch left behind


def test_without_a_compiler_auto_falls_back_and_paged_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(native, "PREBUILT", tmp_path / "no-prebuilt")
    kernel_dir = str(tmp_path / "kernels")
    assert native.decode_kernel(kernel_dir) is None
    model = tiny_model("llama", tmp_path / "model")
    runner = ModelRunner(model, 16, 4, AttentionBackend.AUTO, kernel_dir=kernel_dir)
    assert runner.attention_backend is AttentionBackend.CASCADE and runner.decode_kernel is None
    with pytest.raises(ConfigError, match=r"worker\.attention_backend: paged"):
        ModelRunner(model, 16, 4, AttentionBackend.PAGED, kernel_dir=kernel_dir)


def test_without_a_compiler_the_prebuilt_kernels_for_this_cpu_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in the container image: kernels prebuilt per x86-64 level where a compiler was, loaded
    where none is; the widest level this CPU runs, and one of another source never."""
    built = native.prebuild(tmp_path / "prebuilt")
    assert sorted(p.name.split("-x86-64-")[0] for p in built) == sorted(list(native.KERNELS) * 2)
    monkeypatch.setattr(native, "PREBUILT", tmp_path / "prebuilt")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    flags = native.cpu_flags()
    level = next((level for level, needs in native.LEVELS.items() if needs <= flags), None)
    linear = native.linear_kernel(str(tmp_path / "kernels"))
    if level is None:  # a CPU below x86-64-v3: torch does the work
        assert linear is None
        return
    chosen = native.find_prebuilt(native.SOURCES / "linear.c")
    assert chosen is not None and chosen.name.startswith(f"linear-{level}-")
    assert linear is not None and not (tmp_path / "kernels").exists()  # nothing compiled
    generator = torch.Generator().manual_seed(3)
    x, weight, bias = (torch.randn(s, generator=generator) for s in ((2, 64), (40, 64), (40,)))
    got = linear(x, linear.pack(weight), bias, 40)
    assert torch.allclose(got, x @ weight.T + bias, rtol=1e-5, atol=1e-5)
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / f"linear-{level}-{'0' * 16}.so").write_bytes(b"")  # a library of another source
    assert native.find_prebuilt(native.SOURCES / "linear.c", stale) is None


def test_auto_is_paged_on_cpu(tmp_path: Path) -> None:
    model = tiny_model("qwen3", tmp_path / "model")
    runner = ModelRunner(model, 16, 4, AttentionBackend.AUTO, kernel_dir=str(tmp_path / "kernels"))
    assert runner.attention_backend is AttentionBackend.PAGED and runner.decode_kernel is not None


@pytest.mark.parametrize("dim", [64, 576, 40])  # 40: a tail shorter than a vector
@pytest.mark.parametrize("rows", [1, 3, 70])  # 70: rows in parallel
def test_add_rms_norm_matches_transformers_arithmetic(dim: int, rows: int) -> None:
    kernel = native.norm_kernel()
    assert kernel is not None
    generator = torch.Generator().manual_seed(dim + rows)
    h, delta, weight = (
        torch.randn(shape, generator=generator) for shape in ((rows, dim), (rows, dim), (dim,))
    )
    want_h = h + delta
    want = rms_norm(want_h, weight, 1e-5)
    x = kernel(h, delta, weight, 1e-5)
    assert torch.equal(h, want_h)  # the residual sum in place, exactly torch's
    assert torch.allclose(x, want, rtol=1e-6, atol=1e-6)
    assert torch.allclose(kernel(want_h.clone(), None, weight, 1e-5), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="fp32"):
        kernel(h.double(), None, weight, 1e-5)


def test_the_decoder_uses_it_only_over_wicores_fp32_linear_layers(tmp_path: Path) -> None:
    path = save_tiny("llama", tmp_path / "model")
    kernels = {"default": False, "auto": True}
    for setting, uses in kernels.items():
        loaded = load_model(load_config(None, {}, {"worker.model": str(path), "worker.cpu_kernels": setting}))
        assert (Decoder(loaded.model).add_norm_kernel is not None) is uses, setting
    int8 = load_model(load_config(None, {}, {"worker.model": str(path), "worker.weight_quant": "int8"}))
    assert Decoder(int8.model).add_norm_kernel is None
