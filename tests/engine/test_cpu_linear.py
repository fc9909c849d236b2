"""CpuLinear (`worker.cpu_kernels: auto | onednn`): every kernel computes the layer (equal to
`F.linear` within rounding), the native one included (csrc/linear.c), each row count goes
through the kernel its table names, and `tune` names the kernel it measured fastest."""

from __future__ import annotations

import pytest
import torch

from wicore.worker.cpu_kernels import CpuLinear, Kernel, KernelTable, onednn_packs, tune, use_cpu_linears
from wicore.worker.native import RowsLinear, linear_kernel


@pytest.fixture(scope="module")
def native() -> RowsLinear:
    kernel = linear_kernel()
    assert kernel is not None, "the kernel must build on the test machine (cc is there)"
    return kernel


@pytest.mark.parametrize("kernel", list(Kernel))
@pytest.mark.parametrize("rows", [1, 2, 3, 16, 70])
def test_every_kernel_computes_the_layer(kernel: Kernel, rows: int, native: RowsLinear) -> None:
    torch.manual_seed(rows)
    linear = torch.nn.Linear(96, 80)
    table = KernelTable((1000,), (kernel,))
    layer = CpuLinear(linear, 16, table, native)
    x = torch.randn(2, rows, 96)  # a batch dimension too: rows are counted flat
    want = torch.nn.functional.linear(x, linear.weight, linear.bias)
    got = layer(x)
    assert got.shape == want.shape and got.is_contiguous()
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    if kernel is Kernel.MKL:
        assert torch.equal(got, want)  # F.linear itself
    assert layer.weight_nbytes == 96 * 80 * 4 + 80 * 4


def test_the_table_picks_by_row_count_and_onednn_above_its_last() -> None:
    table = KernelTable((1, 2, 4, 8), (Kernel.MKL, Kernel.MKL_WT, Kernel.ONEDNN, Kernel.MKL))
    assert [table.pick(n) for n in (1, 2, 3, 4, 5, 8, 9, 500)] == [
        Kernel.MKL,
        Kernel.MKL_WT,
        Kernel.ONEDNN,
        Kernel.ONEDNN,
        Kernel.MKL,
        Kernel.MKL,
        Kernel.ONEDNN,
        Kernel.ONEDNN,
    ]
    assert table.describe() == "rows 1 mkl, 2 mkl_wt, 3-4 onednn, 5-8 mkl, 9+ onednn"
    assert KernelTable().describe() == "rows 1+ onednn"


def test_each_row_count_runs_the_weight_copy_its_kernel_reads() -> None:
    layer = CpuLinear(torch.nn.Linear(32, 24, bias=False), 16, KernelTable((2,), (Kernel.MKL_WT,)))
    assert layer.plain is not None
    layer.plain = torch.zeros_like(layer.plain)  # only the MKL kernels see this
    x = torch.randn(3, 32)
    assert torch.equal(layer(x[:1]), torch.zeros(1, 24))
    assert torch.equal(layer(x[:2]), torch.zeros(2, 24))
    assert layer(x).abs().sum() > 0  # 3 rows: oneDNN's packed copy


def test_the_native_kernel_reads_its_packed_weight(native: RowsLinear) -> None:
    layer = CpuLinear(torch.nn.Linear(32, 24), 16, KernelTable((13,), (Kernel.NATIVE,)), native)
    assert layer.native is native and layer.native_weight is not None
    layer.native_weight = torch.zeros_like(layer.native_weight)  # only the native kernel sees this
    x = torch.randn(14, 32)
    for rows in (1, 4, 12, 13):  # one pass of up to 12 rows (6 without AVX-512), then more
        assert torch.equal(layer(x[:rows]), layer.bias.expand(rows, 24))
    assert not torch.allclose(layer(x), layer.bias.expand(14, 24))  # 14 rows: oneDNN's packed copy


@pytest.mark.parametrize("features", [(40, 37), (7, 3), (576, 960)])
@pytest.mark.parametrize("rows", [1, 5, 13, 30])
def test_the_packed_layout_takes_any_shape(features: tuple[int, int], rows: int, native: RowsLinear) -> None:
    """Blocks of `native.block` output features; the last one padded with zeros, never written out."""
    torch.manual_seed(rows)
    linear = torch.nn.Linear(*features)
    packed = native.pack(linear.weight)
    assert packed.shape == (-(-features[1] // native.block), features[0], native.block)
    x = torch.randn(rows, features[0])
    got = native(x, packed, linear.bias, features[1])
    assert got.shape == (rows, features[1])
    assert torch.allclose(
        got, torch.nn.functional.linear(x, linear.weight, linear.bias), atol=1e-5, rtol=1e-5
    )
    with pytest.raises(ValueError, match="packed weight"):
        native(x, packed, linear.bias, features[1] + native.block)


@pytest.mark.parametrize("with_native", [False, True])
def test_tune_names_the_fastest_kernel_it_measured_at_each_row_count(
    with_native: bool, native: RowsLinear
) -> None:
    kernel_of = native if with_native else None
    layers = [CpuLinear(torch.nn.Linear(64, 64), 16, KernelTable(), kernel_of) for _ in range(3)]
    table, seconds = tune(layers, rows=(1, 4, 32), repeats=2)
    assert table.rows == (1, 4, 32) and sorted(seconds) == [1, 4, 32]
    others = {k.value for k in Kernel} - {Kernel.NATIVE.value}
    for n, kernel in zip(table.rows, table.kernels, strict=True):
        # The native kernel is a candidate at every row count, where the layers have it.
        assert set(seconds[n]) == others | ({Kernel.NATIVE.value} if with_native else set())
        assert seconds[n][kernel.value] == min(seconds[n].values())


def test_use_cpu_linears_shares_one_table_and_drops_the_copy_no_kernel_reads() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    x = torch.randn(5, 16)
    want = model(x)
    table = use_cpu_linears(model, measure=False)
    layers = [m for m in model.modules() if isinstance(m, CpuLinear)]
    assert len(layers) == 2 and table == KernelTable()
    assert all(layer.table is table and layer.plain is None for layer in layers)  # oneDNN only
    assert torch.allclose(model(x), want, atol=1e-5)
    measured = use_cpu_linears(model2 := torch.nn.Sequential(torch.nn.Linear(16, 8)), measure=True)
    assert measured.rows and all(isinstance(m.table, KernelTable) for m in model2 if isinstance(m, CpuLinear))
    assert (model2[0].plain is not None) == measured.uses_plain
    assert (model2[0].native_weight is not None) == measured.uses_native


@pytest.mark.skipif(not onednn_packs(torch.bfloat16), reason="oneDNN does not pack bf16 weights on this CPU")
@pytest.mark.parametrize("kernel", list(Kernel))
def test_bf16_layers_run_every_kernel_in_bf16(kernel: Kernel, native: RowsLinear) -> None:
    linear = torch.nn.Linear(64, 48).to(torch.bfloat16)
    layer = CpuLinear(linear, 16, KernelTable((8,), (kernel,)), native)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    got = layer(x)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(
        got.float(), torch.nn.functional.linear(x, linear.weight, linear.bias).float(), atol=0.05
    )


def test_tune_leaves_the_process_random_state_alone() -> None:
    layers = [CpuLinear(torch.nn.Linear(32, 32), 16, KernelTable())]
    torch.manual_seed(7)
    want = torch.rand(4)
    torch.manual_seed(7)
    tune(layers, rows=(1, 2), repeats=1)
    assert torch.equal(torch.rand(4), want)


def test_mkl_picks_within_a_margin_of_the_native_kernel_go_to_it_and_free_the_plain_copy() -> None:
    from wicore.worker.cpu_kernels import _fewer_copies

    mkl, wt, native, onednn = Kernel.MKL, Kernel.MKL_WT, Kernel.NATIVE, Kernel.ONEDNN

    def seconds(*native_over_mkl: float) -> dict[int, dict[str, float]]:
        return {
            n: {"mkl": 1.0, "mkl_wt": 1.0, "native": r, "onednn": 2.0} for n, r in enumerate(native_over_mkl)
        }

    assert _fewer_copies([mkl, native, onednn], seconds(1.04, 0.9, 3.0), [0, 1, 2]) == [
        native,
        native,
        onednn,
    ]
    # Slower by more than the margin: MKL keeps its rows, and the plain copy stays.
    assert _fewer_copies([mkl, native], seconds(1.2, 0.9), [0, 1]) == [mkl, native]
    # All or nothing: one MKL pick left would keep the plain copy anyway.
    assert _fewer_copies([mkl, wt, native], seconds(1.01, 1.3, 0.9), [0, 1, 2]) == [mkl, wt, native]
    # Only MKL or only native: nothing to save.
    assert _fewer_copies([mkl, onednn], seconds(1.01, 3.0), [0, 1]) == [mkl, onednn]
