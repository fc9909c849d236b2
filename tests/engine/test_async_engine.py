"""AsyncEngine's streams: a caller that keeps up gets one delta per token; a caller that falls
behind the engine gets the waiting deltas merged into one, and either way the tokens, text,
logprobs and counts are exactly those of the engine's own greedy run."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from wicore.worker.async_engine import AsyncEngine
from wicore.worker.engine_types import EngineRequest, FinishReason
from wicore.worker.output import Delta
from wicore.worker.paged_engine import EngineConfig, PagedEngine

from tiny_models import generate_greedy, save_tiny

NEW = 24


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("llama"))


async def collect(engine: AsyncEngine, request: EngineRequest, lag_s: float) -> list[Delta]:
    deltas = []
    async for delta in engine.generate(request):
        deltas.append(delta)
        await asyncio.sleep(lag_s)  # the engine runs on; a slow caller's deltas pile up
    return deltas


def test_slow_callers_get_merged_deltas_with_the_same_tokens_text_and_logprobs(tiny: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    prompts = [[5, 9, 13, 21, 30, 41, 8], [7, 7, 19, 3, 52]]
    expected = [generate_greedy(model, ids, NEW) for ids in prompts]  # before the engine takes the model
    engine = AsyncEngine(PagedEngine(model, EngineConfig(num_blocks=64, block_size=4), "fp"), tokenizer)
    engine.start()
    requests = [
        EngineRequest(f"r{i}", ids, NEW, stop_token_ids=frozenset(), logprobs=2)
        for i, ids in enumerate(prompts)
    ]

    async def both() -> tuple[list[Delta], list[Delta]]:
        fast = asyncio.create_task(collect(engine, requests[0], 0.0))
        slow = asyncio.create_task(collect(engine, requests[1], 0.05))
        return await fast, await slow

    try:
        fast, slow = asyncio.run(both())
    finally:
        engine.stop()

    for ids, want, deltas in ((prompts[0], expected[0], fast), (prompts[1], expected[1], slow)):
        tokens = [t for d in deltas for t in d.token_ids]
        assert tokens == want
        assert "".join(d.text for d in deltas) == tokenizer.decode(
            tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        assert [lp.token_id for d in deltas for lp in d.logprobs] == tokens
        assert all(len(lp.top) == 2 for d in deltas for lp in d.logprobs)
        assert [d.completion_tokens for d in deltas] == sorted({d.completion_tokens for d in deltas})
        assert deltas[-1].completion_tokens == NEW and deltas[-1].prompt_tokens == len(ids)
        assert deltas[-1].finish_reason is FinishReason.LENGTH and deltas[-1].times is not None
        assert all(d.finish_reason is None for d in deltas[:-1])
    assert len(fast) > len(slow) >= 2  # the slow caller's deltas were merged (and not all into one)
