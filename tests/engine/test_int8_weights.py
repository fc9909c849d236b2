"""int8 weight-only linear layers (`worker.weight_quant: int8`): the quantization's bound, both
of Int8Linear's row regimes, and the paged engine over an int8 model against that model's
own `generate`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from wicore.config import load_config
from wicore.worker.app import load_model
from wicore.worker.cpu_kernels import CpuLinear, Int8Linear, quantize_int8
from wicore.worker.paged_engine import EngineConfig, PagedEngine

from tiny_models import engine_greedy, generate_greedy, save_tiny


def test_quantization_rounds_each_weight_to_its_rows_nearest_step() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 48) * torch.linspace(0.01, 3.0, 64)[:, None]  # rows of very different ranges
    w[5] = 0.0  # an all-zero row must not divide by zero
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    assert int(q.abs().max()) == 127
    error = (w - q.float() * scale[:, None]).abs()
    assert bool((error <= scale[:, None] / 2 + 1e-7).all())
    assert torch.equal(q[5], torch.zeros(48, dtype=torch.int8))


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 17, 300])
def test_int8_linear_is_the_dequantized_layer(rows: int) -> None:
    torch.manual_seed(rows)
    linear = torch.nn.Linear(96, 80)
    layer = Int8Linear(linear)
    x = torch.randn(rows, 96)
    dequantized = layer.weight_int8.float() * layer.scales[:, None]
    want = torch.nn.functional.linear(x, dequantized, linear.bias)
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == (rows, 80)
    # Up to KERNEL_ROWS rows the activations pass through bf16 (8 mantissa bits).
    tolerance = 0.05 if rows <= Int8Linear.KERNEL_ROWS else 1e-4
    assert torch.allclose(got, want, atol=tolerance, rtol=0.02)
    # and the 3-d shape of a model's hidden states is kept
    assert layer(x.view(1, rows, 96)).shape == (1, rows, 80)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("int8") / "tiny-llama")


def test_every_linear_is_replaced_and_the_kv_identity_changes(tiny: Path) -> None:
    fp32 = load_model(load_config(None, {}, {"worker.model": str(tiny)}))
    int8 = load_model(load_config(None, {}, {"worker.model": str(tiny), "worker.weight_quant": "int8"}))
    linears = [m for m in int8.model.modules() if isinstance(m, torch.nn.Linear | CpuLinear)]
    assert linears == []
    # 4 layers of qkv, o, gate_up and down (fused: decoder.py), and the head
    assert sum(isinstance(m, Int8Linear) for m in int8.model.modules()) == 4 * 4 + 1
    # Blocks computed with other weights are other blocks: the prefix cache must not mix them.
    assert int8.fingerprint != fp32.fingerprint


def test_the_engine_over_int8_weights_matches_their_generate(tiny: Path) -> None:
    loaded = load_model(load_config(None, {}, {"worker.model": str(tiny), "worker.weight_quant": "int8"}))
    tok = AutoTokenizer.from_pretrained(tiny)
    prompt = list(tok("The quick brown fox jumps over the lazy dog. WiCore serves").input_ids)
    want = generate_greedy(loaded.model, prompt, 16)  # before the engine puts its attention in
    engine = PagedEngine(loaded.model, EngineConfig(num_blocks=64, block_size=4), loaded.fingerprint)
    assert engine_greedy(engine, [prompt], 16) == [want]
