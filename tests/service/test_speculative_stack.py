"""Speculative decoding through the whole stack: `wicore up --set worker.speculative.method=ngram`
(and `draft`, the served model as its own draft).

Greedy answers over gRPC and the OpenAI HTTP API (the official `openai` client, streamed)
equal `model.generate`'s; the worker reports its proposals and acceptances in its heartbeat
(ListWorkers) and its /metrics (read with prometheus_client's parser)."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM, AutoTokenizer

from wicore.v1 import inference_pb2 as pb
from wicore.v1 import inference_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

from stack import Stack, free_port, start_stack, until
from tiny_models import generate_greedy

PROMPT = "one two three four one two three four one two"
NEW = 40


@pytest.fixture(scope="module")
def http_port() -> int:
    return free_port()


@pytest.fixture(scope="module", params=["ngram", "draft"])
def stack(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_llama_dir: Path,
    redis_url: str,
    http_port: int,
) -> Iterator[Stack]:
    spec = {"method": request.param, "num_tokens": 4}
    if request.param == "draft":
        spec |= {"draft_model": str(tiny_llama_dir), "draft_kv_cache_bytes": 8 << 20}
    settings = {"gateway.http_port": http_port, "worker.speculative": spec}
    s = start_stack(tmp_path_factory.mktemp("spec"), str(tiny_llama_dir), redis_url, settings=settings)
    yield s
    assert s.stop() == 0, s.log()[-3000:]
    assert "bug in" not in s.log(), s.log()[-3000:]


def expected(model_dir: Path) -> list[int]:
    """generate()'s greedy tokens, through the first end-of-sequence token (where serving stops)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokens = generate_greedy(model, list(tokenizer(PROMPT).input_ids), NEW)
    eos = tokenizer.eos_token_id
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def worker_metrics(stack: Stack) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{stack.metrics['worker-0']}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


async def test_speculation_serves_generates_tokens_and_reports_acceptance(
    stack: Stack, tiny_llama_dir: Path, http_port: int
) -> None:
    want = await asyncio.to_thread(expected, tiny_llama_dir)
    async with grpc.aio.insecure_channel(stack.gateway) as channel:
        reply = await inference_pb2_grpc.InferenceStub(channel).Generate(
            pb.GenerateRequest(prompt=PROMPT, max_tokens=NEW, sampling=pb.SamplingParams(temperature=0.0)),
            timeout=60,
        )
    assert list(reply.token_ids) == want
    assert reply.usage.completion_tokens == len(want)

    async with openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0, timeout=60
    ) as client:
        chunks = await client.completions.create(
            model="tiny-llama", prompt=PROMPT, max_tokens=NEW, temperature=0, stream=True
        )
        text = "".join([c.choices[0].text async for c in chunks if c.choices])
    assert text == reply.text

    async def reported() -> bool:
        async with stack.internal_channel(stack.scheduler) as channel:
            workers = await scheduler_pb2_grpc.SchedulerStub(channel).ListWorkers(
                scheduler_pb2.ListWorkersRequest()
            )
        load = workers.workers[0].load
        return load.spec_drafts > 0 and 0 < load.spec_accepted_tokens <= load.spec_proposed_tokens

    await until(reported, "the worker's heartbeat to carry its speculation counters")
    samples = await asyncio.to_thread(worker_metrics, stack)
    assert samples["wicore:spec_decode_num_drafts_total"] > 0
    accepted = samples["wicore:spec_decode_num_accepted_tokens_total"]
    assert 0 < accepted <= samples["wicore:spec_decode_num_draft_tokens_total"]
