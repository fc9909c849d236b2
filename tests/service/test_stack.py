"""The four services as processes (`wicore up`) on loopback, a tiny Llama built
from a config, a real Redis: what a client sees."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import AutoModelForCausalLM, AutoTokenizer

from wicore.v1 import inference_pb2 as pb
from wicore.v1 import inference_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc

from stack import Stack, start_stack

PROMPTS = [
    "The quick brown fox",
    "WiCore serves language models",
    "Héllo wörld 你好",
    "def add(a, b):",
    "Paged attention keeps",
    "emoji 🙂 too",
    "The lazy dog",
    "over gRPC to clients",
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, redis_url: str) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("stack"), str(tiny_llama_dir), redis_url)
    yield s
    assert s.stop() == 0, s.log()[-3000:]


@pytest.fixture(scope="module")
def hf(tiny_llama_dir: Path) -> tuple[object, object]:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture()
async def client(stack: Stack) -> inference_pb2_grpc.InferenceStub:
    channel = grpc.aio.insecure_channel(stack.gateway)
    yield inference_pb2_grpc.InferenceStub(channel)
    await channel.close()


def reference(hf: tuple[object, object], prompt: str, max_new: int) -> list[int]:
    model, tokenizer = hf
    ids = tokenizer(prompt, return_tensors="pt").input_ids  # type: ignore[operator]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False)  # type: ignore[attr-defined]
    return out[0, ids.shape[1] :].tolist()


def greedy(prompt: str, max_tokens: int = 24, **kw: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt=prompt, max_tokens=max_tokens, sampling=pb.SamplingParams(temperature=0.0), **kw
    )


async def collect(stream: object) -> tuple[str, list[int], list[pb.GenerateStreamResponse]]:
    msgs = [m async for m in stream]  # type: ignore[attr-defined]
    return "".join(m.text for m in msgs), [t for m in msgs for t in m.token_ids], msgs


async def test_every_service_reports_serving(stack: Stack) -> None:
    for address in [stack.gateway, stack.scheduler, stack.tier, *stack.workers]:
        async with grpc.aio.insecure_channel(address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, address


async def test_greedy_matches_model_generate(client: inference_pb2_grpc.InferenceStub, hf: tuple) -> None:
    for prompt in PROMPTS[:4]:
        reply = await client.Generate(greedy(prompt, 24))
        expected = reference(hf, prompt, 24)
        assert list(reply.token_ids) == expected, prompt
        assert reply.text == hf[1].decode(expected, skip_special_tokens=True)
        assert reply.usage.completion_tokens == len(expected)
        assert reply.usage.prompt_tokens == len(hf[1](prompt).input_ids)
        eos = hf[1].eos_token_id
        want = pb.FINISH_REASON_STOP if expected[-1] == eos else pb.FINISH_REASON_LENGTH
        assert reply.finish_reason == want


async def test_stream_deltas_join_to_the_unary_text(client: inference_pb2_grpc.InferenceStub) -> None:
    for prompt in PROMPTS:
        unary = await client.Generate(greedy(prompt, 40, ignore_eos=True))
        text, ids, msgs = await collect(client.GenerateStream(greedy(prompt, 40, ignore_eos=True)))
        assert text == unary.text and ids == list(unary.token_ids)
        assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
        assert msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert msgs[-1].usage.completion_tokens == 40
        assert "\ufffd" not in "".join(m.text for m in msgs[:-1]) or "\ufffd" in unary.text


async def test_concurrent_requests_get_what_they_get_alone(client: inference_pb2_grpc.InferenceStub) -> None:
    def requests() -> list[pb.GenerateRequest]:
        greedy_reqs = [greedy(p, 32, ignore_eos=True) for p in PROMPTS]
        sampled = [
            pb.GenerateRequest(
                prompt=p, max_tokens=32, ignore_eos=True,
                sampling=pb.SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234 + i),
            )
            for i, p in enumerate(PROMPTS)
        ]  # fmt: skip
        return greedy_reqs + sampled

    alone = [await client.Generate(r) for r in requests()]
    together = await asyncio.gather(*(client.Generate(r) for r in requests()))
    for a, t in zip(alone, together, strict=True):
        assert (a.text, list(a.token_ids)) == (t.text, list(t.token_ids))
    # Different seeds give different samples (the seed is really used).
    assert len({tuple(r.token_ids) for r in alone[len(PROMPTS) :]}) > 1


async def test_stop_string_ends_the_output_before_it(client: inference_pb2_grpc.InferenceStub) -> None:
    full = await client.Generate(greedy(PROMPTS[1], 40, ignore_eos=True))
    stop = full.text[10:14]
    assert len(stop) == 4
    reply = await client.Generate(greedy(PROMPTS[1], 40, ignore_eos=True, stop=[stop]))
    assert reply.finish_reason == pb.FINISH_REASON_STOP
    assert reply.text == full.text[: full.text.index(stop)]
    text, _, _ = await collect(client.GenerateStream(greedy(PROMPTS[1], 40, ignore_eos=True, stop=[stop])))
    assert text == reply.text


INVALID = grpc.StatusCode.INVALID_ARGUMENT
TOO_BIG = grpc.StatusCode.RESOURCE_EXHAUSTED


def req(prompt: str = "x", **sampling: float) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(**sampling))


BAD_INPUTS = [
    (req(""), INVALID, "prompt"),
    (req(temperature=-0.5), INVALID, "sampling.temperature"),
    (req(temperature=float("nan")), INVALID, "sampling.temperature"),
    (req(temperature=float("inf")), INVALID, "sampling.temperature"),
    (req(top_p=0.0), INVALID, "sampling.top_p"),
    (req(top_p=1.5), INVALID, "sampling.top_p"),
    (req(top_k=-1), INVALID, "sampling.top_k"),
    (req(min_p=1.5), INVALID, "sampling.min_p"),
    (req(repetition_penalty=0.0), INVALID, "sampling.repetition_penalty"),
    (pb.GenerateRequest(prompt="x", logprobs=21), INVALID, "logprobs"),
    (pb.GenerateRequest(prompt="x", max_tokens=0), INVALID, "max_tokens"),
    (pb.GenerateRequest(prompt="x", stop=["ok", ""]), INVALID, "stop[1]"),
    (pb.GenerateRequest(prompt="x", max_tokens=5000), TOO_BIG, "max_tokens"),
    (pb.GenerateRequest(prompt="x " * 4100, max_tokens=1), TOO_BIG, "context"),
    (pb.GenerateRequest(prompt="x", model="no-such-model"), grpc.StatusCode.NOT_FOUND, "model"),
]


@pytest.mark.parametrize(("request_msg", "code", "named"), BAD_INPUTS)
async def test_bad_input_gets_its_code(
    client: inference_pb2_grpc.InferenceStub,
    request_msg: pb.GenerateRequest,
    code: grpc.StatusCode,
    named: str,
) -> None:
    for call in (client.Generate(request_msg), collect(client.GenerateStream(request_msg))):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == code
        assert named in (err.value.details() or "")
    # ... and the service keeps answering.
    assert (await client.Generate(greedy("ok", 2))).usage.completion_tokens == 2


async def worker_running(stack: Stack) -> int:
    async with stack.internal_channel(stack.scheduler) as channel:
        reply = await scheduler_pb2_grpc.SchedulerStub(channel).ListWorkers(
            scheduler_pb2.ListWorkersRequest()
        )
    return sum(w.load.running + w.load.waiting for w in reply.workers)


async def test_cancelled_stream_frees_the_worker(
    client: inference_pb2_grpc.InferenceStub, stack: Stack
) -> None:
    call = client.GenerateStream(greedy("The quick brown fox", 4000, ignore_eos=True))
    seen = 0
    async for _ in call:
        seen += 1
        if seen == 3:
            break
    deadline = time.monotonic() + 3.0
    while await worker_running(stack) == 0:  # the load arrives with the next heartbeat
        assert time.monotonic() < deadline, "the running request never showed in the worker's load"
        await asyncio.sleep(0.05)
    assert call.cancel()
    assert await call.code() == grpc.StatusCode.CANCELLED
    deadline = time.monotonic() + 3.0
    while await worker_running(stack) > 0:
        assert time.monotonic() < deadline, "the cancelled request still runs on the worker"
        await asyncio.sleep(0.05)
    assert (await client.Generate(greedy("still there", 3))).usage.completion_tokens == 3


async def test_deadline_reaches_the_worker(client: inference_pb2_grpc.InferenceStub, stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.Generate(greedy("The quick brown fox", 4000, ignore_eos=True), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 3.0
    while await worker_running(stack) > 0:
        assert time.monotonic() < deadline, "the expired request still runs on the worker"
        await asyncio.sleep(0.05)


async def test_tokenize_and_list_models(client: inference_pb2_grpc.InferenceStub, hf: tuple) -> None:
    reply = await client.Tokenize(pb.TokenizeRequest(text="Héllo wörld"))
    assert list(reply.token_ids) == hf[1].encode("Héllo wörld", add_special_tokens=False)
    models = await client.ListModels(pb.ListModelsRequest())
    assert [m.id for m in models.models] == ["tiny-llama"] and models.default_model == "tiny-llama"
    assert models.models[0].max_context == 4096 and models.models[0].workers == 1


async def test_a_repeated_prompt_reuses_its_cached_prefix(
    client: inference_pb2_grpc.InferenceStub, hf: tuple
) -> None:
    prompt = "Paged attention keeps the KV cache in fixed-size blocks. " * 3
    first = await client.Generate(greedy(prompt, 8, cache_salt="stack-test"))
    second = await client.Generate(greedy(prompt, 8, cache_salt="stack-test"))
    n = len(hf[1](prompt).input_ids)
    assert first.usage.cached_tokens == 0
    assert second.usage.cached_tokens == (n - 1) // 16 * 16 > 0  # every full block but the last
    assert list(second.token_ids) == list(first.token_ids) == reference(hf, prompt, 8)


async def test_logprobs_come_with_each_token(client: inference_pb2_grpc.InferenceStub) -> None:
    reply = await client.Generate(greedy(PROMPTS[0], 5, ignore_eos=True, logprobs=3))
    assert [lp.token_id for lp in reply.logprobs] == list(reply.token_ids)
    for lp in reply.logprobs:
        assert len(lp.top) == 3 and lp.top[0].token_id == lp.token_id  # greedy picks the top token
        assert lp.logprob <= 0 and lp.top[0].logprob >= lp.top[1].logprob >= lp.top[2].logprob


async def test_worker_resume_continues_a_stream_where_it_stopped(stack: Stack, hf: tuple) -> None:
    """A resumed request (what the scheduler sends when a worker dies mid-stream): the tokens
    already streamed join the prompt, the rest comes out as in one uninterrupted run."""
    prompt, n = "The quick brown fox", 24
    want = reference(hf, prompt, n)
    ids = hf[1].encode(prompt)

    def tokenized(request_id: str, generated: list[int]) -> worker_pb2.TokenizedRequest:
        options = greedy("", max_tokens=n, request_id=request_id)
        return worker_pb2.TokenizedRequest(
            request=options, prompt_token_ids=ids, generated_token_ids=generated
        )

    async with stack.internal_channel(stack.workers[0]) as channel:
        worker = worker_pb2_grpc.WorkerStub(channel)
        # The worker merges the tokens a slow reader has not yet taken into one message, so
        # the stream is cut where a message ended (the scheduler resumes from what it got),
        # as near the middle as this run's messages allow.
        for attempt in range(3):
            whole = [m async for m in worker.Generate(tokenized(f"whole{attempt}", []))]
            ends = list(itertools.accumulate(len(m.token_ids) for m in whole))[:-1]
            if ends:
                break
        assert [t for m in whole for t in m.token_ids] == want
        assert ends, "three streams of 24 tokens each came as one message"
        k = min(ends, key=lambda end: abs(end - n // 2))
        rest = [m async for m in worker.Generate(tokenized("r", want[:k]))]
        assert [t for m in rest for t in m.token_ids] == want[k:]
        assert rest[-1].usage.prompt_tokens == whole[-1].usage.prompt_tokens
        assert rest[-1].usage.completion_tokens == n
        cut = ends.index(k) + 1  # the messages the uninterrupted stream had sent after k tokens
        sent = "".join(m.text for m in whole[:cut])
        assert sent + "".join(m.text for m in rest) == "".join(
            m.text for m in whole
        )  # nothing twice, nothing lost

        for bad, field in (
            (tokenized("b1", [10**6]), "generated_token_ids"),
            (tokenized("b2", want), "generated_token_ids"),
            (
                worker_pb2.TokenizedRequest(request=greedy("", 4), prompt_token_ids=[10**6]),
                "prompt_token_ids",
            ),
            (worker_pb2.TokenizedRequest(request=greedy("", 4)), "prompt_token_ids"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [m async for m in worker.Generate(bad)]
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (err.value.details() or "").startswith(f"{field}:")


def chat(*turns: tuple[str, str], max_tokens: int = 12, **kw: object) -> pb.ChatRequest:
    options = pb.GenerateRequest(max_tokens=max_tokens, sampling=pb.SamplingParams(temperature=0.0), **kw)
    return pb.ChatRequest(messages=[pb.ChatMessage(role=r, content=c) for r, c in turns], options=options)


def reference_ids(hf: tuple, ids: list[int], max_new: int) -> list[int]:
    model = hf[0]
    t = torch.tensor([ids])
    out = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=max_new, do_sample=False)
    return out[0, len(ids) :].tolist()


async def test_chat_applies_the_models_template_once(
    client: inference_pb2_grpc.InferenceStub, hf: tuple
) -> None:
    turns = [("system", "Be brief."), ("user", "What is the capital of France?")]
    reply = await client.Chat(chat(*turns, ignore_eos=True))
    rendered = hf[1].apply_chat_template(
        [{"role": r, "content": c} for r, c in turns],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    text = hf[1].decode(rendered)
    assert text.endswith("<|im_start|>assistant\n") and text.count("<|im_start|>") == 3
    assert list(reply.token_ids) == reference_ids(hf, rendered, 12)
    assert reply.usage.prompt_tokens == len(rendered)
    streamed = [m async for m in client.ChatStream(chat(*turns, ignore_eos=True))]
    assert "".join(m.text for m in streamed) == reply.text
    assert [t for m in streamed for t in m.token_ids] == list(reply.token_ids)


async def test_a_conversation_resent_with_one_more_turn_reuses_its_history(
    client: inference_pb2_grpc.InferenceStub, hf: tuple
) -> None:
    history = [
        ("system", "You answer questions about paged attention. " * 3),
        ("user", "What is a KV block?"),
    ]
    first = await client.Chat(chat(*history, cache_salt="conversation"))
    rendered = hf[1].apply_chat_template(
        [{"role": r, "content": c} for r, c in history],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    second = await client.Chat(
        chat(*history, ("assistant", first.text), ("user", "And a block hash?"), cache_salt="conversation")
    )
    assert first.usage.cached_tokens == 0
    assert second.usage.cached_tokens >= (len(rendered) - 1) // 16 * 16 > 0


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.ChatRequest(), "messages"),
        (chat(("robot", "hi")), "messages[0].role"),
        (chat(("user", "hi"), prompt="text"), "options.prompt"),
        (
            pb.ChatRequest(
                messages=[pb.ChatMessage(role="user", content="hi")],
                options=pb.GenerateRequest(sampling=pb.SamplingParams(top_p=2.0)),
            ),
            "options.sampling.top_p",
        ),
        (chat(("user", "hi"), max_tokens=0), "options.max_tokens"),
        (chat(("user", "hi"), model="other"), "model"),
    ],
)
async def test_chat_names_the_bad_field(
    client: inference_pb2_grpc.InferenceStub, request_: pb.ChatRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.Chat(request_)
    expected = grpc.StatusCode.NOT_FOUND if field == "model" else grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.code() == expected
    assert (err.value.details() or "").startswith(f"{field}:")
