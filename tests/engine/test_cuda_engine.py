"""The paged engine on a CUDA device: greedy output against `model.generate` on the same
device for every supported family, the default dtype there (bf16), and the KV pool sized
from the device's memory. Marked `cuda`: skipped, saying so, without a CUDA device;
`benchmark/gpu_check.py` runs them.

float32 must match exactly (no TF32: the worker leaves it off by default). In bfloat16 the
engine's packed batches and `generate`'s one-at-a-time passes round differently, so near-ties
may flip and the continuations part: there the bar is agreement, not identity.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from wicore.config import Config, GiB, load_config
from wicore.worker.app import LoadedModel, engine_config, load_model
from wicore.worker.kv_budget import cuda_memory, kv_pool_blocks, model_activation_reserve
from wicore.worker.model_runner import kv_layout
from wicore.worker.paged_attention import KVPool
from wicore.worker.paged_engine import EngineConfig, PagedEngine

from tiny_models import FAMILIES, engine_greedy, generate_greedy, save_tiny

pytestmark = pytest.mark.cuda

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. WiCore serves language models",
    "Héllo",
    "def add(a, b):\n    return a + b\n",
    "Paged attention keeps the KV cache in fixed-size blocks.",
]
MAX_NEW = 20
# Engine settings: chunked prefill with several blocks per sequence; then a pool small enough to preempt.
CHUNKED = EngineConfig(num_blocks=64, block_size=4, max_num_batched_tokens=7)
PREEMPTING = EngineConfig(num_blocks=24, block_size=4, max_num_batched_tokens=64)
# bf16: at least this share of all generated tokens lie in the common prefix with generate's.
BF16_AGREEMENT = 0.5


@pytest.fixture(scope="module", params=FAMILIES)
def tiny_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(request.param, tmp_path_factory.mktemp("models") / f"tiny-{request.param}")


def worker_config(path: Path, **overrides: object) -> Config:
    return load_config(None, {}, {"worker.model": str(path), "worker.device": "gpu:0", **overrides})


def expected(path: Path, dtype: torch.dtype, prompt_ids: list[list[int]]) -> list[list[int]]:
    """generate()'s greedy tokens, one prompt at a time, on the same device and dtype."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to("cuda").eval()
    return [generate_greedy(model, ids, MAX_NEW) for ids in prompt_ids]


def greedy(loaded: LoadedModel, config: EngineConfig, prompt_ids: list[list[int]]) -> list[list[int]]:
    return engine_greedy(PagedEngine(loaded.model, config, loaded.fingerprint), prompt_ids, MAX_NEW)


def prompt_ids(path: Path) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    return [list(tokenizer(p).input_ids) for p in PROMPTS]


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def test_float32_greedy_output_matches_generate(tiny_dir: Path) -> None:
    loaded = load_model(worker_config(tiny_dir, **{"worker.dtype": "float32"}))
    assert loaded.model.device.type == "cuda" and loaded.model.dtype == torch.float32
    ids = prompt_ids(tiny_dir)
    reference = expected(tiny_dir, torch.float32, ids)
    assert greedy(loaded, CHUNKED, ids) == reference
    assert greedy(loaded, PREEMPTING, ids) == reference


def test_bfloat16_is_the_default_and_agrees_with_generate(tiny_dir: Path) -> None:
    loaded = load_model(worker_config(tiny_dir))  # worker.dtype auto: mixed_precision bf16
    assert loaded.model.dtype == torch.bfloat16
    ids = prompt_ids(tiny_dir)
    reference = expected(tiny_dir, torch.bfloat16, ids)
    produced = greedy(loaded, CHUNKED, ids)
    agreed = sum(common_prefix(p, r) for p, r in zip(produced, reference, strict=True))
    assert agreed >= BF16_AGREEMENT * MAX_NEW * len(ids), (produced, reference)


def test_the_kv_pool_is_sized_from_the_devices_memory(tiny_llama_dir: Path) -> None:
    gc.collect()  # earlier tests' models: freed now, not between the two readings below
    config = worker_config(tiny_llama_dir)
    loaded = load_model(config)
    model = loaded.model
    layers, kv_heads, head_dim = kv_layout(model)
    per_block = KVPool.bytes_per_block(layers, config.worker.block_size, kv_heads, head_dim, model.dtype)
    blocks = engine_config(config, model).num_blocks
    memory = cuda_memory(model.device)
    reserve = model_activation_reserve(config, model)
    assert blocks == kv_pool_blocks(memory.total, memory.used, 0.9, 0, reserve, per_block)
    free = memory.total - memory.used
    assert 0 < blocks * per_block <= free - reserve
    # The pool fits beside the weights, and a whole step's worth of tokens still runs.
    pool = KVPool(layers, blocks, config.worker.block_size, kv_heads, head_dim, model.dtype, model.device)
    try:
        tokens = torch.zeros(1, config.worker.max_num_batched_tokens, dtype=torch.long, device=model.device)
        with torch.inference_mode():
            assert model(tokens).logits.isfinite().all()
    finally:
        del pool
        torch.cuda.empty_cache()
    capped = worker_config(tiny_llama_dir, **{"gpu_config.memory_limit_per_gpu": 0.001})
    assert engine_config(capped, model).num_blocks == int(0.001 * GiB) // per_block
