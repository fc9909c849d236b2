"""The KV-fidelity harness (benchmark/fidelity_bench.py) on a tiny random Llama: the lossless
codec must reproduce the reference exactly and a lossy one must not, so the harness cannot
be comparing a cache with itself."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch


def _load_bench():
    path = Path(__file__).resolve().parents[2] / "benchmark" / "fidelity_bench.py"
    spec = importlib.util.spec_from_file_location("fidelity_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fidelity_bench", module)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    return model.eval()


def test_raw_is_exact_and_q4_is_not(tiny_model) -> None:
    vocab = tiny_model.config.vocab_size
    prompts = torch.randint(3, vocab, (2, 41), generator=torch.Generator().manual_seed(0))
    results = bench.measure(tiny_model, prompts, codecs=("raw", "q4"), new_tokens=8, batch=2)
    assert results["raw"] == {"top1": 1.0, "kl": 0.0, "identical": 1.0, "first_divergence": None}
    bench.check_raw(results)
    assert results["q4"]["kl"] > 0.0


def test_round_trip_keeps_the_partial_block_exact() -> None:
    kv = torch.randn(2, 2, 1, 3, 21, 8, generator=torch.Generator().manual_seed(1))  # one block + 5 tokens
    out = bench.round_trip(kv, "q4")
    assert torch.equal(out[..., 16:, :], kv[..., 16:, :])
    assert not torch.equal(out[..., 4:16, :], kv[..., 4:16, :])
    assert torch.equal(bench.round_trip(kv, "raw"), kv)


def test_check_raw_fails_loudly() -> None:
    with pytest.raises(RuntimeError, match="raw round trip"):
        bench.check_raw({"raw": {"top1": 0.99, "kl": 0.0, "identical": 1.0}})
