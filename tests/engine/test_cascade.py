"""Cascade attention (a shared prefix read once for all its sequences) against `generate`
and against the gather path, for every supported family, sliding windows included; and the
same through the `paged` backend, whose decode steps read each sequence's own keys in place
(native kernel) and merge them with the shared prefix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from wicore.config import load_config
from wicore.worker import paged_attention
from wicore.worker.app import load_model
from wicore.worker.cascade import Part, attend, shared_prefixes
from wicore.worker.engine_types import EngineRequest, StepOutput
from wicore.worker.paged_attention import KVPool
from wicore.worker.paged_engine import EngineConfig, PagedEngine

from tiny_models import FAMILIES, generate_greedy, run_engine, save_tiny

# ~70 tokens: longer than the sliding families' window of 8, so some of their rows see no
# shared key at all.
SYSTEM = (
    "You are WiCore, a helpful assistant. Paged attention keeps the KV cache in blocks of "
    "sixteen tokens, and a prefix shared by many requests is computed once. "
)
OTHER = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
# Two groups sharing a prefix each, and one prompt sharing nothing, all in one batch.
PROMPTS = [SYSTEM + q for q in ("What is a block?", "def add(a, b):", "Héllo wörld", "Why share a prefix?")]
PROMPTS += [OTHER + "def mul(a, b):", OTHER + "class Point:", "Paged attention keeps"]


@pytest.fixture(scope="module", params=FAMILIES)
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(request.param, tmp_path_factory.mktemp("cascade") / f"tiny-{request.param}")


def engine(path: Path, backend: str, **config: Any) -> PagedEngine:
    overrides = {"worker.model": str(path), "worker.cpu_kernels": "default"}
    loaded = load_model(load_config(None, {}, overrides))
    return PagedEngine(loaded.model, EngineConfig(attention_backend=backend, **config), loaded.fingerprint)


def run(eng: PagedEngine, requests: list[EngineRequest]) -> dict[str, list[StepOutput]]:
    return run_engine(eng, requests)


def shared_batch(path: Path, backend: str, block_size: int) -> tuple[dict[str, list[StepOutput]], int]:
    """The two shared prefixes alone, then PROMPTS at once (prefix-cache hits); returns their
    outputs and how many attention calls went through the backend's own path (the cascade; for
    `paged`, the native decode kernel)."""
    tok = AutoTokenizer.from_pretrained(path)
    eng = engine(path, backend, num_blocks=256, block_size=block_size)
    run(
        eng,
        [EngineRequest(f"warm{i}", list(tok(p + "Hi").input_ids), 2) for i, p in enumerate((SYSTEM, OTHER))],
    )
    calls = 0
    name = "paged_decode_attention" if backend == "paged" else "cascade_attention"
    original = getattr(paged_attention, name)

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    setattr(paged_attention, name, counting)
    try:
        requests = [
            EngineRequest(f"q{i}", list(tok(p).input_ids), 16, logprobs=3) for i, p in enumerate(PROMPTS)
        ]
        return run(eng, requests), calls
    finally:
        setattr(paged_attention, name, original)


@pytest.mark.parametrize("backend", ["cascade", "paged"])
@pytest.mark.parametrize("block_size", [4, 16])
def test_sequences_sharing_a_prefix_match_generate(model_dir: Path, block_size: int, backend: str) -> None:
    outputs, calls = shared_batch(model_dir, backend, block_size)
    assert calls > 0  # the shared prefix did go through the cascade (paged: decode steps, natively)
    tok = AutoTokenizer.from_pretrained(model_dir)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for i, prompt in enumerate(PROMPTS):
        want = generate_greedy(reference, list(tok(prompt).input_ids), 16)
        got = [t for out in outputs[f"q{i}"] for t in out.new_token_ids]
        assert got == want, prompt
        assert (outputs[f"q{i}"][0].cached_tokens > 0) is (i < 6)


@pytest.mark.parametrize("backend", ["cascade", "paged"])
def test_cascade_and_gather_give_the_same_distributions(model_dir: Path, backend: str) -> None:
    cascade, calls = shared_batch(model_dir, backend, 4)
    gather, none = shared_batch(model_dir, "gather", 4)
    assert calls > 0 and none == 0
    for rid, outs in gather.items():
        for a, b in zip(cascade[rid], outs, strict=True):
            assert a.new_token_ids == b.new_token_ids
            (la,), (lb,) = a.logprobs, b.logprobs
            assert la.logprob == pytest.approx(lb.logprob, abs=1e-4)
            assert [t for t, _ in la.top] == [t for t, _ in lb.top]


def test_shared_prefixes_are_the_common_computed_leading_blocks() -> None:
    tables = [[7, 8, 9, 1], [7, 8, 9, 2], [7, 8, 3], [4, 5, 6], [4, 5], [10, 11, 12]]
    computed = [16, 16, 9, 12, 8, 12]  # block size 4
    groups = shared_prefixes(tables, computed, 4)
    # 0, 1, 2 share 7, 8 (2 has computed only 2 blocks); 3 and 4 share 4, 5; 5 is alone.
    assert sorted(groups) == [([0, 1, 2], 2), ([3, 4], 2)]
    # A block written in this step is not shared yet; one shared block is not worth a cascade.
    assert shared_prefixes([[1, 2], [1, 2]], [4, 4], 4) == []
    assert shared_prefixes([[1, 2, 3], [1, 2, 4]], [8, 8], 4, min_blocks=3) == []
    assert shared_prefixes([[1, 2, 3], [1, 2, 4]], [8, 8], 4, min_blocks=1) == [([0, 1], 2)]


def test_a_prefix_reads_the_same_keys_in_place_and_through_its_ids() -> None:
    pool = KVPool(2, 8, 4, 2, 3, torch.float32, torch.device("cpu"))
    for t in (*pool.keys, *pool.values):
        t.copy_(torch.randn(t.shape))
    one = torch.zeros(1, dtype=torch.long)
    ids = torch.tensor([3, 4, 5])
    in_place = Part(None, one, 0, 1, one[None], one, prefix_ids=ids, prefix_first=3)
    copied = Part(None, one, 0, 1, one[None], one, prefix_ids=ids, prefix_first=None)
    k1, v1 = in_place.prefix_kv(pool, 1)
    k2, v2 = copied.prefix_kv(pool, 1)
    assert k1.shape == (1, 2, 12, 3)
    assert torch.equal(k1, k2) and torch.equal(v1, v2)
    assert k1.data_ptr() == pool.keys[1][12:].data_ptr()  # a view of the pool, no copy
    assert torch.equal(k1[0, :, 0], pool.keys[1][12])


def test_attend_returns_the_log_sum_exp_of_its_scores() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    allowed = torch.rand(2, 1, 5, 7) > 0.3
    allowed[..., 0] = True
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, -torch.inf)
    out, lse = attend(q, k, v, mask, 0.25)
    scores = (q @ k.transpose(-1, -2)) * 0.25 + mask
    assert torch.allclose(lse, torch.logsumexp(scores, -1), atol=1e-5)
    assert torch.allclose(out, torch.softmax(scores, -1) @ v, atol=1e-5)
