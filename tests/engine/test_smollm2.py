"""The paged engine on the real default model, SmolLM2-135M-Instruct."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from wicore.config import Config, load_config
from wicore.model_files import ensure_smollm2
from wicore.worker.app import load_model
from wicore.worker.engine_types import EngineRequest
from wicore.worker.paged_engine import EngineConfig, PagedEngine

pytestmark = pytest.mark.slow

SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)
PROMPTS = [
    SYSTEM + "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    SYSTEM + "<|im_start|>user\nWrite a haiku about memory.<|im_end|>\n<|im_start|>assistant\n",
    "The history of the Roman Empire",
    "def fibonacci(n):",
]


@pytest.fixture(scope="module")
def smollm2() -> tuple[str, list[list[int]], dict[int, list[int]]]:
    path = ensure_smollm2(Config().cache_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = [list(tokenizer(p).input_ids) for p in PROMPTS]
    expected = {}
    for i, x in enumerate(ids):
        out = reference.generate(
            torch.tensor([x]),
            attention_mask=torch.ones(1, len(x), dtype=torch.long),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=None,
        )
        expected[i] = out[0, len(x) :].tolist()
    return str(path), ids, expected


@pytest.mark.parametrize("kernels", ["default", "auto"])
def test_smollm2_matches_generate_with_chunks_and_prefix_hits(smollm2: tuple, kernels: str) -> None:
    path, ids, expected = smollm2
    loaded = load_model(load_config(None, {}, {"worker.model": path, "worker.cpu_kernels": kernels}))
    engine = PagedEngine(
        loaded.model, EngineConfig(num_blocks=256, block_size=16, max_num_batched_tokens=24), "x"
    )
    for wave in range(2):  # the second wave hits the prefix cache (the shared system prompt and more)
        for i, x in enumerate(ids):
            engine.add_request(EngineRequest(f"{wave}-{i}", x, 24))
        got: dict[str, list[int]] = {}
        cached: dict[str, int] = {}
        while engine.has_unfinished():
            for out in engine.step():
                got.setdefault(out.request_id, []).extend(out.new_token_ids)
                cached[out.request_id] = out.cached_tokens
            engine.pool.check_integrity()
        for i in range(len(ids)):
            assert got[f"{wave}-{i}"] == expected[i], (kernels, wave, PROMPTS[i])
        if wave == 0:  # (request 1 may already reuse request 0's system-prompt blocks)
            assert cached["0-0"] == 0
        else:  # every full block but the one holding the last prompt token is reused
            assert [cached[f"1-{i}"] for i in range(len(ids))] == [(len(x) - 1) // 16 * 16 for x in ids]
