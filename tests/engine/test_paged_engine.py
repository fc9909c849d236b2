"""The paged engine against `model.generate`, for every supported family.

Tiny models from configs (random weights) are saved and loaded through the
worker's real loader; greedy output must be identical token for token, with
mixed lengths, chunked prefill, prefix-cache hits and preemption. The block
pool's integrity is checked after every step.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from wicore.config import load_config
from wicore.errors import ConfigError
from wicore.worker.app import load_model
from wicore.worker.engine_types import EngineRequest, FinishReason, SamplingParams, StepOutput
from wicore.worker.paged_attention import StepMetadata
from wicore.worker.paged_engine import EngineConfig, PagedEngine

from tiny_models import FAMILIES, build_tokenizer, run_engine, save_tiny

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. WiCore serves language models",
    "Héllo",
    "def add(a, b):\n    return a + b\n",
    "Paged attention keeps the KV cache in fixed-size blocks.",
]
SYSTEM = "You are WiCore, a helpful assistant. Paged attention keeps the KV cache in blocks. "


class Family:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self._expected: dict[tuple[str, int], list[int]] = {}

    def ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt).input_ids)

    def expected(self, prompt: str, max_new: int) -> list[int]:
        """generate()'s greedy tokens. The explicit all-ones attention mask matters: without
        it, generate() may treat pad-id tokens inside the prompt (e.g. <|im_end|>) as padding."""
        key = (prompt, max_new)
        if key not in self._expected:
            ids = torch.tensor([self.ids(prompt)])
            out = self.reference.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new,
                do_sample=False,
                eos_token_id=None,
            )
            self._expected[key] = out[0, ids.shape[1] :].tolist()
        return self._expected[key]

    def engine(self, kernels: str = "auto", **config: int) -> PagedEngine:
        overrides = {"worker.model": str(self.path), "worker.cpu_kernels": kernels}
        loaded = load_model(load_config(None, {}, overrides))
        return PagedEngine(loaded.model, EngineConfig(**config), loaded.fingerprint)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Family:
    return Family(save_tiny(request.param, tmp_path_factory.mktemp("models") / f"tiny-{request.param}"))


def run(engine: PagedEngine, requests: list[EngineRequest]) -> dict[str, list[StepOutput]]:
    return run_engine(engine, requests)


def tokens(outputs: list[StepOutput]) -> list[int]:
    return [t for out in outputs for t in out.new_token_ids]


def greedy(
    family: Family, prompts: list[str], max_new: int = 20, kernels: str = "auto", **engine_config: int
) -> PagedEngine:
    engine = family.engine(kernels, **engine_config)
    requests = [EngineRequest(f"r{i}", family.ids(p), max_new) for i, p in enumerate(prompts)]
    outputs = run(engine, requests)
    for i, prompt in enumerate(prompts):
        assert tokens(outputs[f"r{i}"]) == family.expected(prompt, max_new), (prompt, engine_config)
        assert outputs[f"r{i}"][-1].finish_reason is FinishReason.LENGTH
    return engine


def test_single_requests_match_generate(family: Family) -> None:
    for prompt in PROMPTS[:2]:
        greedy(family, [prompt], num_blocks=64, block_size=16)


def test_mixed_lengths_with_chunked_prefill_match_generate(family: Family) -> None:
    # A budget of 7 tokens splits every prompt but "Héllo" into chunks.
    greedy(family, PROMPTS, num_blocks=64, block_size=4, max_num_batched_tokens=7)


def test_the_models_own_kernels_match_generate_bit_for_bit(family: Family) -> None:
    """cpu_kernels=default keeps transformers' own linear layers (the exact path)."""
    greedy(family, PROMPTS, kernels="default", num_blocks=64, block_size=4, max_num_batched_tokens=7)


def test_preemption_under_a_small_pool_matches_generate(family: Family) -> None:
    engine = greedy(family, PROMPTS, num_blocks=24, block_size=4, max_num_batched_tokens=64)
    assert engine.num_preemptions > 0


def test_prefix_cache_hits_match_generate(family: Family) -> None:
    engine = family.engine(num_blocks=128, block_size=4)
    first = run(engine, [EngineRequest("a", family.ids(SYSTEM + "Hello"), 12)])
    assert first["a"][0].cached_tokens == 0
    prompts = [SYSTEM + "What is paged attention?", SYSTEM + "def add(a, b):"]
    outputs = run(engine, [EngineRequest(f"r{i}", family.ids(p), 12) for i, p in enumerate(prompts)])
    shared = len(family.ids(SYSTEM)) // 4 * 4 - 4  # whole blocks inside the system prompt, at least
    for i, prompt in enumerate(prompts):
        assert outputs[f"r{i}"][0].cached_tokens >= shared > 0
        assert tokens(outputs[f"r{i}"]) == family.expected(prompt, 12)
    # The same prompt again: everything but its last block is reused.
    again = run(engine, [EngineRequest("b", family.ids(prompts[0]), 12)])
    n = len(family.ids(prompts[0]))
    assert again["b"][0].cached_tokens == (n - 1) // 4 * 4
    assert tokens(again["b"]) == family.expected(prompts[0], 12)


def test_cache_salt_isolates_prefixes(family: Family) -> None:
    engine = family.engine(num_blocks=64, block_size=4)
    ids = family.ids(SYSTEM)
    run(engine, [EngineRequest("a", ids, 2, cache_salt="tenant-a")])
    other = run(engine, [EngineRequest("b", ids, 2, cache_salt="tenant-b")])
    same = run(engine, [EngineRequest("c", ids, 2, cache_salt="tenant-a")])
    assert other["b"][0].cached_tokens == 0
    assert same["c"][0].cached_tokens > 0


def test_seeded_sampling_is_the_same_alone_and_in_any_batch(family: Family) -> None:
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, min_p=0.01, repetition_penalty=1.1, seed=5)
    target = EngineRequest("t", family.ids(PROMPTS[0]), 24, sampling=params)
    alone = run(family.engine(num_blocks=64, block_size=4), [target])
    others = [
        EngineRequest(f"o{i}", family.ids(p), 10 + i, sampling=SamplingParams(temperature=1.0, seed=i))
        for i, p in enumerate(PROMPTS)
    ]
    crowded = run(family.engine(num_blocks=64, block_size=4, max_num_batched_tokens=5), [*others, target])
    assert tokens(crowded["t"]) == tokens(alone["t"])
    unseeded = EngineRequest(
        "u", family.ids(PROMPTS[0]), 24, sampling=SamplingParams(temperature=0.9, seed=6)
    )
    assert tokens(run(family.engine(num_blocks=64, block_size=4), [unseeded])["u"]) != tokens(alone["t"])


def test_logprobs_are_the_models_distribution(family: Family) -> None:
    engine = family.engine(num_blocks=64, block_size=16)
    ids = family.ids(PROMPTS[0])
    outputs = run(engine, [EngineRequest("r", ids, 3, logprobs=2)])
    first = outputs["r"][0].logprobs[0]
    with torch.no_grad():
        logits = family.reference(torch.tensor([ids])).logits[0, -1]
    expected = torch.log_softmax(logits, -1)
    assert first.token_id == int(expected.argmax())
    assert first.logprob == pytest.approx(float(expected.max()), abs=1e-4)
    top_ids = [t for t, _ in first.top]
    assert top_ids == expected.topk(2).indices.tolist()


SLIDING = {"mistral", "gemma3"}


def test_the_sliding_window_really_matters(family: Family, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ignoring the window changes the output of the sliding families (so the equality
    tests above do check the window) and nothing for the others."""
    original: Callable[..., Any] = StepMetadata.mask
    monkeypatch.setattr(StepMetadata, "mask", lambda self, window: original(self, None))
    engine = family.engine(num_blocks=64, block_size=4)
    outputs = run(engine, [EngineRequest("r", family.ids(PROMPTS[0]), 20)])
    same = tokens(outputs["r"]) == family.expected(PROMPTS[0], 20)
    assert same is (family.path.name.removeprefix("tiny-") not in SLIDING)


def test_a_request_larger_than_the_pool_is_refused(family: Family) -> None:
    engine = family.engine(num_blocks=4, block_size=4)
    with pytest.raises(Exception, match="exceeds this worker's KV cache of 16 tokens"):
        engine.add_request(EngineRequest("r", family.ids(PROMPTS[0]), 4))
    engine.pool.check_integrity()


def test_unsupported_architectures_are_refused_at_load(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="architecture 'gpt2' is not supported"):
        load_model(load_config(None, {}, {"worker.model": str(tmp_path)}))
