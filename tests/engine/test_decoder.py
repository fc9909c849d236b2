"""WiCore's own forward pass (`worker.model_impl: auto`, decoder.py) against transformers' modules
(`transformers`) on the same loaded model: with the model's own kernels, every logprob of every
step is bit for bit the same, through mixed prefill chunks, decode rows, prefix-cache hits and
speculative-free sampling; Gemma 3, which has no Decoder, keeps the modules."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from wicore.config import load_config
from wicore.worker.app import engine_config, load_model
from wicore.worker.engine_types import EngineRequest, StepOutput
from wicore.worker.paged_engine import PagedEngine

from tiny_models import FAMILIES, run_engine, save_tiny

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. WiCore serves language models",
    "Héllo",
    "The quick brown fox jumps over the lazy dog. Paged attention keeps blocks",
]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(request.param, tmp_path_factory.mktemp("decoder") / f"tiny-{request.param}")


def engine(path: Path, impl: str, kernels: str = "default") -> PagedEngine:
    config = load_config(
        None,
        {},
        {
            "worker.model": str(path),
            "worker.model_impl": impl,
            "worker.cpu_kernels": kernels,
            "worker.block_size": 4,
            "worker.max_num_batched_tokens": 9,
            "worker.kv_cache_bytes": 1 << 20,
        },
    )
    loaded = load_model(config)
    return PagedEngine(loaded.model, engine_config(config, loaded.model), loaded.fingerprint)


def logprobs(outputs: dict[str, list[StepOutput]]) -> dict[str, list[tuple[int, float, tuple]]]:
    return {
        rid: [(lp.token_id, lp.logprob, lp.top) for out in outs for lp in out.logprobs]
        for rid, outs in outputs.items()
    }


def test_the_own_forward_runs_where_the_family_has_one(tiny: Path) -> None:
    own = engine(tiny, "auto").runner.decoder is not None
    assert own is (tiny.name != "tiny-gemma3")
    assert engine(tiny, "transformers").runner.decoder is None


def test_every_logprob_is_bit_for_bit_the_modules(tiny: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny)
    results = {}
    for impl in ("auto", "transformers"):
        eng = engine(tiny, impl)
        first = run_engine(eng, [EngineRequest("warm", list(tok(PROMPTS[0]).input_ids), 4, logprobs=3)])
        # The rest reuse the first prompt's blocks, prefill in chunks of 9 beside decode rows.
        requests = [
            EngineRequest(f"r{i}", list(tok(p).input_ids), 12, logprobs=3) for i, p in enumerate(PROMPTS)
        ]
        results[impl] = logprobs(first | run_engine(eng, requests))
        assert any(out.cached_tokens for out in run_engine(eng, requests[:1])["r0"])
    assert results["auto"] == results["transformers"]
    assert len(results["auto"]["r1"]) == 12


def test_with_the_fast_kernels_it_still_matches_the_modules_tokens(tiny: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny)
    requests = [EngineRequest(f"r{i}", list(tok(p).input_ids), 12) for i, p in enumerate(PROMPTS)]
    got = {
        impl: {
            rid: [t for o in outs for t in o.new_token_ids] for rid, outs in run_engine(eng, requests).items()
        }
        for impl in ("auto", "transformers")
        for eng in [engine(tiny, impl, kernels="auto")]
    }
    assert got["auto"] == got["transformers"]


def test_fast_kernels_fuse_the_projections_and_the_modules_still_run(tiny: Path) -> None:
    """Under tuned CPU kernels, q/k/v and gate/up become one layer each; transformers' own
    forward over the fused model (through the Parts) still computes what it did before."""
    import torch
    from transformers import AutoModelForCausalLM

    from wicore.worker.cpu_kernels import CpuLinear
    from wicore.worker.decoder import Part

    fused = engine(tiny, "auto", kernels="auto").runner.model
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    family_fuses = tiny.name != "tiny-gemma3"
    assert isinstance(getattr(attn, "qkv_proj", None), CpuLinear) is family_fuses
    assert isinstance(getattr(mlp, "gate_up_proj", None), CpuLinear) is family_fuses
    assert isinstance(attn.q_proj, Part) is family_fuses
    assert not any(isinstance(m, Part) for m in engine(tiny, "auto").runner.model.modules())  # exact mode
    reference = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    ids = torch.tensor([list(AutoTokenizer.from_pretrained(tiny)(PROMPTS[0]).input_ids)])
    fused.set_attn_implementation("sdpa")  # the engine's runner had put its paged attention in
    with torch.inference_mode():
        assert torch.allclose(fused(ids).logits, reference(ids).logits, atol=1e-4)
