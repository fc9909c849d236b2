"""OneDnnLinear (`worker.cpu_kernels: onednn`): an fp32 layer runs up to MKL_ROWS rows through
MKL on its plain weight (bit for bit `F.linear`) and more rows through oneDNN's packed weight
(equal within rounding); bf16 layers keep oneDNN at every size."""

from __future__ import annotations

import pytest
import torch

from wicore.worker.cpu_kernels import OneDnnLinear, onednn_packs


@pytest.mark.parametrize("rows", [1, 2, 3, 16, 70])
def test_fp32_layer_is_mkl_bit_for_bit_up_to_its_row_limit_and_onednn_above(rows: int) -> None:
    torch.manual_seed(rows)
    linear = torch.nn.Linear(96, 80)
    layer = OneDnnLinear(linear, batch_hint=16)
    x = torch.randn(2, rows, 96)  # a batch dimension too: rows are counted flat
    want = torch.nn.functional.linear(x, linear.weight, linear.bias)
    got = layer(x)
    assert got.shape == want.shape
    if 2 * rows <= OneDnnLinear.MKL_ROWS:
        assert torch.equal(got, want)
    else:
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert layer.weight_nbytes == 96 * 80 * 4 + 80 * 4


def test_one_row_takes_the_plain_weight_and_more_rows_the_packed_one() -> None:
    layer = OneDnnLinear(torch.nn.Linear(32, 24, bias=False), batch_hint=16)
    assert layer.plain is not None
    layer.plain = torch.zeros_like(layer.plain)  # only the MKL path sees this
    x = torch.randn(OneDnnLinear.MKL_ROWS + 1, 32)
    assert torch.equal(layer(x[:1]), torch.zeros(1, 24))
    assert layer(x).abs().sum() > 0


@pytest.mark.skipif(not onednn_packs(torch.bfloat16), reason="oneDNN does not pack bf16 weights on this CPU")
def test_bf16_layers_keep_one_copy_and_onednn_at_every_size() -> None:
    layer = OneDnnLinear(torch.nn.Linear(64, 48).to(torch.bfloat16), batch_hint=16)
    assert layer.plain is None
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
