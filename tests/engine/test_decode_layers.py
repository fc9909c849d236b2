"""A decode step's layers in one native call (decode_layers.py, csrc/decode_layers.c) against the
same layers run operation by operation through torch, on the same loaded model: with each linear
kernel a decode step can pick (the native one, MKL's `x @ W.T` and `W @ x.T`), every logprob of
every step is the same (exact, except that silu's `exp` may differ in the last bit), through a
sliding window (Mistral), q/k/v biases (Qwen2), prefill chunks beside decode rows (torch's steps)
and shared prefixes (attended once for their members and merged in, natively too)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from wicore.config import load_config
from wicore.worker import cpu_kernels
from wicore.worker.app import engine_config, load_model
from wicore.worker.cpu_kernels import Kernel, KernelTable
from wicore.worker.decode_layers import DecodeLayers
from wicore.worker.engine_types import EngineRequest
from wicore.worker.paged_engine import PagedEngine

from tiny_models import run_engine, save_tiny

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. WiCore serves language models",
    "Héllo",
    "The quick brown fox jumps over the lazy dog. Paged attention keeps blocks",
    "def add(a, b):",
]
ALONE = ["Héllo wörld", "def add(a, b):", "Paged attention", "0123456789"]


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "qwen3"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(request.param, tmp_path_factory.mktemp("fused") / f"tiny-{request.param}")


def loaded_with(
    path: Path, kernel: Kernel, monkeypatch: pytest.MonkeyPatch, sample_every: int = 0
) -> tuple[Any, Any]:
    """The model as a worker loads it, every row count up to 64 through `kernel` (not measured)."""
    table = KernelTable((64,), (kernel,))
    monkeypatch.setattr(cpu_kernels, "tune", lambda layers, *args, **kwargs: (table, {}))
    config = load_config(
        None,
        {},
        {
            "worker.model": str(path),
            "worker.block_size": 4,
            "worker.max_num_batched_tokens": 9,
            "worker.kv_cache_bytes": 1 << 20,
            "worker.attention_sample_every": sample_every,
        },
    )
    return load_model(config), config


def logprobs(eng: PagedEngine, path: Path) -> dict[str, list[tuple[int, float]]]:
    tok = AutoTokenizer.from_pretrained(path)
    first = [EngineRequest("warm", list(tok(PROMPTS[0]).input_ids), 4, logprobs=2)]
    # The rest share the first prompt's blocks (a prefix, attended once for them), prefill in
    # chunks of 9 beside decode rows, then decode 1-4 rows at a time.
    requests = [EngineRequest(f"r{i}", list(tok(p).input_ids), 14, logprobs=2) for i, p in enumerate(PROMPTS)]
    # Then prompts that share no block, decoding together (4 rows), and finishing one by one.
    alone = [
        EngineRequest(f"a{i}", list(tok(p).input_ids), 10 + 4 * i, logprobs=2) for i, p in enumerate(ALONE)
    ]
    outputs = run_engine(eng, first) | run_engine(eng, requests) | run_engine(eng, alone)
    return {
        rid: [(lp.token_id, lp.logprob) for out in outs for lp in out.logprobs]
        for rid, outs in outputs.items()
    }


@pytest.mark.parametrize("kernel", [Kernel.NATIVE, Kernel.MKL, Kernel.MKL_WT, Kernel.ONEDNN])
def test_fused_steps_give_the_torch_steps_logprobs(
    tiny: Path, kernel: Kernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NATIVE, MKL, MKL_WT: every layer in one call; ONEDNN: the linear layers in torch, what lies
    between them in one call each (the segments)."""
    loaded, config = loaded_with(tiny, kernel, monkeypatch)
    engines = [
        PagedEngine(loaded.model, engine_config(config, loaded.model), loaded.fingerprint) for _ in range(2)
    ]
    fused = engines[0].runner.decoder.fused
    if tiny.name == "tiny-qwen3":  # per-head q/k norms: not in the fused call; torch runs every step
        assert fused is None
        return
    assert fused is not None
    assert (fused.kernel_for(1) is None) is (kernel is Kernel.ONEDNN)
    engines[1].runner.decoder.fused = None
    whole, segments = [], []  # (rows, whether a shared prefix was passed) of each call; segments: layer 0's
    run, attend = fused._fn, fused._attend
    fused._fn = lambda *args: whole.append((args[3], args[14] is not None)) or run(*args)
    fused._attend = lambda *args: (
        (args[1] == 0 and segments.append((args[3], args[14] is not None))) or attend(*args)
    )
    got, want = (logprobs(eng, tiny) for eng in engines)
    calls = segments if kernel is Kernel.ONEDNN else whole
    assert not (whole if kernel is Kernel.ONEDNN else segments)
    assert {rows for rows, _ in calls} == {1, 2, 3, 4} and len(calls) > 25, calls  # decode steps of 1-4 rows
    assert any(shared for _, shared in calls)  # steps with a shared prefix, merged natively too
    assert got.keys() == want.keys()
    for rid in want:
        assert [t for t, _ in got[rid]] == [t for t, _ in want[rid]], rid
        for (_, a), (_, b) in zip(got[rid], want[rid], strict=True):
            assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5), rid


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("fused") / "tiny-llama")


def test_row_counts_through_onednn_run_through_torch(llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for kernel, code in ((Kernel.MKL, 1), (Kernel.NATIVE, 0)):
        loaded, config = loaded_with(llama, kernel, monkeypatch)
        eng = PagedEngine(loaded.model, engine_config(config, loaded.model), loaded.fingerprint)
        fused = eng.runner.decoder.fused
        assert isinstance(fused, DecodeLayers)
        assert fused.kernel_for(1) == code and fused.kernel_for(64) == code
        assert fused.kernel_for(65) is None  # oneDNN above the table's last row count: not callable from C
    # A kernel whose weights the layers did not keep (only the native kernel's are): not fused.
    fused.table = KernelTable((4,), (Kernel.MKL,))
    assert fused.kernel_for(4) is None


def test_steps_that_probe_attention_run_through_torch(llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A²CR's probe measures one layer's attention in torch: a step that probes is not fused."""
    loaded, config = loaded_with(llama, Kernel.MKL, monkeypatch, sample_every=1)
    eng = PagedEngine(loaded.model, engine_config(config, loaded.model), loaded.fingerprint)
    fused = eng.runner.decoder.fused
    assert fused is not None
    calls = []
    run = fused._fn
    fused._fn = lambda *args: calls.append(args[3]) or run(*args)
    outputs = run_engine(eng, [EngineRequest("r", [5, 6, 7, 8, 9], 6)])
    assert len([t for out in outputs["r"] for t in out.new_token_ids]) == 6
    assert calls == []
