"""The OpenAI-compatible HTTP API of a real stack (`wicore up`, loopback): the official
`openai` client for what works, raw HTTP for error shapes and status codes, a client
that hangs up (the worker must drop the request), and a fuzzer that must never get
a 500. The tiny model has random weights, so outputs are compared with the gRPC API
(greedy) rather than with expected text."""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx2
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wicore.config import GatewayConfig
from wicore.gateway.auth import KeyRing
from wicore.gateway.frontend import Frontend
from wicore.gateway.http_api import HttpFront
from wicore.gateway.prompts import PromptTokenizer
from wicore.v1 import inference_pb2 as pb
from wicore.v1 import inference_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

from certs import Authority
from stack import Stack, free_port, start_stack, until

KEY, LIMITED_KEY = "wc-http-test-key", "wc-http-limited-key"
AUTH = {"authorization": f"Bearer {KEY}"}
BODY_LIMIT = 64 * 1024
MODEL = "tiny-llama"  # the name of conftest's model directory
HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox"}]


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="module")
def http_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, redis_url: str, http_port: int
) -> Iterator[Stack]:
    settings = {
        "gateway.http_port": http_port,
        "gateway.api_keys": [
            {"sha256": digest(KEY), "tenant": "alice"},
            {"sha256": digest(LIMITED_KEY), "tenant": "limited"},
        ],
        "gateway.tenants": {"limited": {"max_concurrent_requests": 1}},
        "gateway.max_http_body_bytes": BODY_LIMIT,
        "worker.default_max_tokens": 16,
    }
    s = start_stack(tmp_path_factory.mktemp("http"), str(tiny_llama_dir), redis_url, settings=settings)
    yield s
    assert s.stop() == 0, s.log()[-3000:]
    assert "bug in" not in s.log(), s.log()[-3000:]


@pytest.fixture(scope="module")
def url(stack: Stack, http_port: int) -> str:
    return f"http://127.0.0.1:{http_port}"


@pytest.fixture()
async def client(url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture()
async def http(url: str) -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(base_url=url, timeout=60) as c:
        yield c


async def grpc_chat(stack: Stack, messages: list[dict[str, str]], max_tokens: int) -> pb.GenerateResponse:
    async with grpc.aio.insecure_channel(stack.gateway) as channel:
        request = pb.ChatRequest(
            messages=[pb.ChatMessage(**m) for m in messages],
            options=pb.GenerateRequest(max_tokens=max_tokens, sampling=pb.SamplingParams(temperature=0)),
        )
        stub = inference_pb2_grpc.InferenceStub(channel)
        reply: pb.GenerateResponse = await stub.Chat(request, metadata=tuple(AUTH.items()))
        return reply


async def sse_events(response: httpx2.Response) -> list[Any]:
    """The `data:` payloads of an SSE body, parsed ("[DONE]" as is)."""
    events = []
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            payload = line[6:]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
        else:
            assert line == "", line
    return events


def assert_error_shape(payload: Any, status: int) -> dict[str, Any]:
    assert set(payload) == {"error"}, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str)
    assert error["param"] is None or isinstance(error["param"], str)
    assert status != 500, error
    return dict(error)


# --- what works, through the official client ---


async def test_models_list_and_retrieve(client: openai.AsyncOpenAI) -> None:
    models = await client.models.list()
    (model,) = models.data
    assert model.id == MODEL and model.owned_by == "wicore"
    assert model.model_extra and model.model_extra["max_model_len"] == 4096
    assert (await client.models.retrieve(MODEL)).id == MODEL
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("no-such-model")


async def test_chat_matches_grpc_chat(client: openai.AsyncOpenAI, stack: Stack) -> None:
    reply = await client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=12,
        temperature=0,
        user="u1",  # type: ignore[arg-type]
    )
    expected = await grpc_chat(stack, HELLO, 12)
    (choice,) = reply.choices
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion" and reply.model == MODEL
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == ("length" if expected.finish_reason == pb.FINISH_REASON_LENGTH else "stop")
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == expected.usage.prompt_tokens
    assert reply.usage.completion_tokens == expected.usage.completion_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


async def test_chat_stream_with_usage(client: openai.AsyncOpenAI, stack: Stack) -> None:
    stream = await client.chat.completions.create(
        messages=HELLO,  # type: ignore[arg-type]
        model=MODEL,
        max_completion_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    expected = await grpc_chat(stack, HELLO, 12)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == expected.text
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == expected.usage.completion_tokens


async def test_chat_with_content_parts_and_n(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "The quick"}, {"type": "text", "text": "fox"}],
            }
        ],
        max_tokens=6,
        temperature=1.0,
        seed=7,
        n=3,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage is not None and reply.usage.completion_tokens == 18  # every choice's tokens
    again = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "The quick\nfox"}],  # parts join with newlines
        max_tokens=6,
        temperature=1.0,
        seed=7,
        n=3,
        extra_body={"ignore_eos": True},
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]


async def test_chat_logprobs(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=3,  # type: ignore[arg-type]
        extra_body={"ignore_eos": True},
    )
    (choice,) = reply.choices
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert len(choice.logprobs.content) == 8
    for item in choice.logprobs.content:
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].token == item.token  # greedy takes the most likely
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)
        assert item.token == (
            bytes(item.bytes).decode() if not item.token.startswith("bytes:") else item.token
        )
    joined = bytes(b for item in choice.logprobs.content for b in item.bytes or [])
    assert joined.decode(errors="replace") == choice.message.content  # the tokens' bytes are the text


async def test_completions_prompts_times_n(client: openai.AsyncOpenAI, http: httpx2.AsyncClient) -> None:
    reply = await client.completions.create(
        model=MODEL,
        prompt=["The quick brown fox", "def add(a, b):"],
        max_tokens=5,
        n=2,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert reply.id.startswith("cmpl-") and reply.object == "text_completion"
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    texts = [c.text for c in reply.choices]
    assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy: a prompt's choices agree
    assert all(c.finish_reason == "length" for c in reply.choices)
    assert reply.usage is not None and reply.usage.completion_tokens == 20
    counts = [
        (await http.post("/tokenize", json={"prompt": p}, headers=AUTH)).json()["count"]
        for p in ("The quick brown fox", "def add(a, b):")
    ]
    assert reply.usage.prompt_tokens == sum(counts)  # each prompt once, whatever n


async def test_completion_stop_string(client: openai.AsyncOpenAI) -> None:
    args: dict[str, Any] = {
        "model": MODEL,
        "prompt": "WiCore serves",
        "max_tokens": 24,
        "temperature": 0,
    }
    whole = (await client.completions.create(**args, extra_body={"ignore_eos": True})).choices[0].text
    assert len(whole) >= 6, whole
    stop = whole[len(whole) // 2 : len(whole) // 2 + 2]
    cut = await client.completions.create(**args, stop=[stop, "\x00never"], extra_body={"ignore_eos": True})
    assert cut.choices[0].text == whole[: whole.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


async def test_completion_stream_and_logprobs(client: openai.AsyncOpenAI) -> None:
    stream = await client.completions.create(
        model=MODEL,
        prompt="The lazy dog",
        max_tokens=6,
        temperature=0,
        logprobs=2,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = [c async for c in stream]
    tokens = [t for c in chunks for t in (c.choices[0].logprobs.tokens or [])]  # type: ignore[union-attr]
    tops = [t for c in chunks for t in (c.choices[0].logprobs.top_logprobs or [])]  # type: ignore[union-attr]
    assert len(tokens) == 6 and all(
        token in top and 2 <= len(top) <= 3 for token, top in zip(tokens, tops, strict=True)
    )
    assert chunks[-1].choices[0].finish_reason == "length"
    whole = await client.completions.create(
        model=MODEL, prompt="The lazy dog", max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


async def test_repeated_prompt_reports_cached_tokens(client: openai.AsyncOpenAI) -> None:
    prompt = f"{uuid.uuid4().hex} " + "Paged attention keeps the KV cache in fixed-size blocks. " * 8
    usages = []
    for _ in range(2):
        reply = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
        assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
        usages.append(reply.usage)
    assert usages[0].prompt_tokens > 64
    assert usages[1].prompt_tokens_details.cached_tokens >= 64  # type: ignore[union-attr]
    assert usages[1].prompt_tokens_details.cached_tokens > usages[0].prompt_tokens_details.cached_tokens  # type: ignore[union-attr]


async def test_tokenize_matches_what_requests_count(
    http: httpx2.AsyncClient, client: openai.AsyncOpenAI
) -> None:
    reply = (
        await http.post("/tokenize", json={"prompt": "Héllo wörld", "return_token_strs": True}, headers=AUTH)
    ).json()
    assert (
        reply["count"] == len(reply["tokens"]) == len(reply["token_strs"]) and reply["max_model_len"] == 4096
    )
    chat = (await http.post("/tokenize", json={"messages": HELLO}, headers=AUTH)).json()
    usage = (await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)).usage  # type: ignore[arg-type]
    assert usage is not None and chat["count"] == usage.prompt_tokens and chat["token_strs"] is None


async def test_health_and_ready(http: httpx2.AsyncClient) -> None:
    assert (await http.get("/health")).status_code == 200  # no key needed
    assert (await http.get("/ready")).json() == {"status": "ready"}


# --- errors: shapes and status codes ---


@pytest.mark.parametrize(
    ("path", "payload", "param"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, "top_p"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": "hi"}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 17}, "n"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
            "temperature",
        ),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": -3}, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "stop": ["ok", ""]}, "stop"),
        ("/v1/completions", {"prompt": [1, 2, 3]}, "prompt"),
        ("/v1/completions", {"prompt": ""}, "prompt"),
        ("/v1/completions", {"max_tokens": 3}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 5000}, "max_tokens"),  # beyond the context
        ("/tokenize", {"prompt": "hi", "messages": HELLO}, "prompt"),
    ],
)
async def test_bad_requests_are_400_naming_the_param(
    http: httpx2.AsyncClient, path: str, payload: dict[str, Any], param: str
) -> None:
    reply = await http.post(path, json=payload, headers=AUTH)
    assert reply.status_code == 400, reply.text
    error = assert_error_shape(reply.json(), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"


async def test_not_json_and_not_objects_are_400(http: httpx2.AsyncClient) -> None:
    for raw in (b'{"prompt": "hi"', b"\xff\xfe", b"[]", b"null", b"", b'"\\ud800"'):
        reply = await http.post("/v1/completions", content=raw, headers=AUTH)
        assert reply.status_code == 400, (raw, reply.text)
        assert_error_shape(reply.json(), 400)


async def test_unknown_fields_are_ignored(http: httpx2.AsyncClient, stack: Stack) -> None:
    payload = {"prompt": "hi", "max_tokens": 2, "guided_json": {"x": 1}, "some_future_field": [1]}
    reply = await http.post("/v1/completions", json=payload, headers=AUTH)
    assert reply.status_code == 200, reply.text
    await until(
        lambda: "ignoring unknown fields guided_json, some_future_field" in stack.log(), "the warning", 5
    )


async def test_authentication(http: httpx2.AsyncClient, client: openai.AsyncOpenAI, url: str) -> None:
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
        reply = await http.post("/v1/completions", json={"prompt": "hi"}, headers=headers)
        if headers.get("authorization") == KEY:  # a bare key is accepted, as gRPC accepts it
            assert reply.status_code == 200
            continue
        assert reply.status_code == 401
        assert assert_error_shape(reply.json(), 401)["code"] == "invalid_api_key"
    for path in ("/v1/models", "/tokenize"):
        assert (await http.request("GET" if "models" in path else "POST", path, json={})).status_code == 401
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError):
            await stranger.models.list()


async def test_unknown_model_and_paths_are_404(http: httpx2.AsyncClient) -> None:
    reply = await http.post("/v1/completions", json={"prompt": "hi", "model": "gpt-9"}, headers=AUTH)
    assert reply.status_code == 404
    error = assert_error_shape(reply.json(), 404)
    assert (error["param"], error["code"]) == ("model", "model_not_found")
    reply = await http.get("/v1/nothing/here", headers=AUTH)
    assert reply.status_code == 404 and assert_error_shape(reply.json(), 404)
    reply = await http.get("/v1/completions", headers=AUTH)
    assert reply.status_code == 405 and assert_error_shape(reply.json(), 405)


async def test_bodies_over_the_limit_are_413(http: httpx2.AsyncClient) -> None:
    big = json.dumps({"prompt": "x" * BODY_LIMIT}).encode()
    reply = await http.post("/v1/completions", content=big, headers=AUTH)  # Content-Length says so
    assert reply.status_code == 413 and assert_error_shape(reply.json(), 413)["code"] == "request_too_large"

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    reply = await http.post("/v1/completions", content=chunked(), headers=AUTH)
    assert reply.status_code == 413 and assert_error_shape(reply.json(), 413)
    fits = json.dumps({"prompt": "hi", "max_tokens": 1, "padding": "x" * (BODY_LIMIT - 100)}).encode()
    assert (await http.post("/v1/completions", content=fits, headers=AUTH)).status_code == 200


async def test_tenant_over_its_limit_gets_429(http: httpx2.AsyncClient) -> None:
    """Tenant "limited" may run one request at a time: its two choices cannot both run."""
    headers = {"authorization": f"Bearer {LIMITED_KEY}"}
    payload = {"prompt": "hi", "max_tokens": 64, "ignore_eos": True, "n": 2}
    reply = await http.post("/v1/completions", json=payload, headers=headers)
    assert reply.status_code == 429, reply.text
    assert assert_error_shape(reply.json(), 429)["type"] == "rate_limit_error"
    one = await http.post("/v1/completions", json={**payload, "n": 1, "max_tokens": 2}, headers=headers)
    assert one.status_code == 200, one.text  # the refused request let go of its slot


async def test_errors_in_a_stream_request_come_before_the_stream(http: httpx2.AsyncClient) -> None:
    payload = {"prompt": "hi", "max_tokens": 5000, "stream": True}
    async with http.stream("POST", "/v1/completions", json=payload, headers=AUTH) as reply:
        assert reply.status_code == 400
        assert assert_error_shape(json.loads(await reply.aread()), 400)["code"] == "context_length_exceeded"


async def test_raw_sse_framing(http: httpx2.AsyncClient) -> None:
    payload = {
        "messages": HELLO,
        "max_tokens": 4,
        "stream": True,
        "n": 2,
        "stream_options": {"include_usage": True},
    }
    async with http.stream("POST", "/v1/chat/completions", json=payload, headers=AUTH) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        events = await sse_events(reply)
    assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and events[-2]["usage"]["total_tokens"] > 0
    finished = {e["choices"][0]["index"] for e in events[:-2] if e["choices"][0]["finish_reason"]}
    assert finished == {0, 1}
    assert [e["choices"][0]["delta"] for e in events[:2]] == [{"role": "assistant", "content": ""}] * 2


# --- a client that goes away ---


async def _worker(stack: Stack) -> scheduler_pb2.WorkerStatus:
    async with stack.internal_channel(stack.scheduler) as channel:
        reply = await scheduler_pb2_grpc.SchedulerStub(channel).ListWorkers(
            scheduler_pb2.ListWorkersRequest()
        )
    (worker,) = reply.workers
    return worker


async def _idle(stack: Stack) -> bool:
    w = await _worker(stack)
    return (
        w.inflight == 0
        and w.reserved_blocks == 0
        and w.load.running == 0
        and w.load.free_blocks == w.total_blocks
    )


async def _decode_rate(http: httpx2.AsyncClient) -> float:
    """Tokens per second of one streamed greedy request (logprobs count them exactly)."""
    payload = {"prompt": "hi", "max_tokens": 60, "ignore_eos": True, "stream": True, "logprobs": 0}
    stamps: list[float] = []
    async with http.stream("POST", "/v1/completions", json=payload, headers=AUTH) as reply:
        async for line in reply.aiter_lines():
            if line.startswith("data: {"):
                stamps += [time.monotonic()] * len(json.loads(line[6:])["choices"][0]["logprobs"]["tokens"])
    assert len(stamps) == 60
    return 59 / max(stamps[-1] - stamps[0], 1e-3)


LONG = {"prompt": "The quick brown fox", "max_tokens": 4000, "ignore_eos": True, "temperature": 0}


async def test_client_gone_mid_stream_frees_the_worker(http: httpx2.AsyncClient, stack: Stack) -> None:
    await until(lambda: _idle(stack), "an idle worker")
    rate = await _decode_rate(http)
    async with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}, headers=AUTH) as reply:
        assert reply.status_code == 200
        lines = 0
        async for line in reply.aiter_lines():
            lines += line.startswith("data: ")
            if lines == 20:
                break
    gone = time.monotonic()  # leaving the block closed the connection
    left_s = (4000 - 20) / rate
    await until(lambda: _idle(stack), "the worker to drop the request", timeout_s=min(10.0, left_s / 2))
    assert time.monotonic() - gone < left_s / 2


async def test_client_gone_while_waiting_frees_the_worker(
    url: str, stack: Stack, http: httpx2.AsyncClient
) -> None:
    await until(lambda: _idle(stack), "an idle worker")
    rate = await _decode_rate(http)
    async with httpx2.AsyncClient(base_url=url, timeout=1.0) as impatient:
        with pytest.raises(httpx2.ReadTimeout):
            await impatient.post("/v1/completions", json=LONG, headers=AUTH)
    gone = time.monotonic()
    left_s = 4000 / rate - 1.0
    await until(lambda: _idle(stack), "the worker to drop the request", timeout_s=min(10.0, left_s / 2))
    assert time.monotonic() - gone < left_s / 2
    assert (await http.get("/ready")).status_code == 200


# --- fuzzing: any body, never a 500 ---

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats()
    | st.text(max_size=12)
)
JUNK = st.recursive(
    SCALARS,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=6,
)
SMALL_TOKENS = st.integers(-2, 4) | JUNK.filter(lambda v: not (isinstance(v, int) and 4 < v <= 5000))
# Plausible values (some still out of range: the gateway's validation must refuse those) ...
PLAUSIBLE: dict[str, Any] = {
    "model": st.just(MODEL),
    "temperature": st.floats(-0.5, 3),
    "top_p": st.floats(-0.1, 1.1),
    "top_k": st.integers(-2, 50),
    "min_p": st.floats(-0.1, 1.1),
    "repetition_penalty": st.floats(-0.1, 3),
    "seed": st.integers(-(2**63), 2**64 - 1) | st.sampled_from([-(2**63) - 1, 2**64]),
    "stop": st.text(min_size=1, max_size=4) | st.lists(st.text(max_size=4), max_size=20),
    "stop_token_ids": st.lists(st.integers(-1, 2**32), max_size=4),
    "n": st.integers(1, 4) | st.sampled_from([0, 16, 17]),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "logprobs": st.booleans() | st.integers(-1, 21),
    "top_logprobs": st.integers(-1, 21),
    "priority": st.integers(-(2**70), 2**70),
    "ignore_eos": st.booleans(),
    "cache_salt": st.text(max_size=300),
    "user": st.text(max_size=10),
    "frequency_penalty": st.just(0) | st.floats(-2, 2),
    "max_completion_tokens": st.integers(0, 4),
}
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "user", "system", "assistant", "developer", "tool"])},
    optional={
        "content": st.text(max_size=30)
        | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)}), max_size=2)
    },
)
PROMPT = st.text(max_size=40) | st.lists(st.text(max_size=10), max_size=3)


def anything(plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """... and anything at all."""
    return plausible | JUNK


@st.composite
def bodies(draw: st.DrawFn, kind: str) -> Any:
    """Plausible bodies, and bodies of any shape with any values (1 in 20 not even an object)."""
    if draw(st.integers(0, 19)) == 0:
        return draw(JUNK)
    chaos = draw(st.booleans())
    pick = anything if chaos else (lambda plausible: plausible)
    chosen = draw(st.lists(st.sampled_from(sorted(PLAUSIBLE)), unique=True, max_size=6))
    payload = {name: draw(pick(PLAUSIBLE[name])) for name in chosen}
    payload["max_tokens"] = draw(SMALL_TOKENS if chaos else st.integers(1, 4))
    if kind == "chat":
        payload["messages"] = draw(
            pick(st.lists(anything(MESSAGE) if chaos else MESSAGE, min_size=1, max_size=4))
        )
    else:
        payload["prompt"] = draw(pick(PROMPT))
    payload.update(draw(st.dictionaries(st.text(max_size=8), JUNK, max_size=2)))  # unknown fields
    return payload


def check_answer(reply: httpx2.Response, seen: Counter[int]) -> None:
    seen[reply.status_code] += 1
    assert reply.status_code != 500, reply.text
    if reply.status_code >= 400:
        assert reply.status_code in (400, 404, 413, 429), reply.text
        assert_error_shape(reply.json(), reply.status_code)
        return
    if reply.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in reply.text.split("\n\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        for event in events[:-1]:
            parsed = json.loads(event)
            if "error" in parsed:
                assert_error_shape(parsed, 400)
            else:
                assert isinstance(parsed["choices"], list)
        return
    assert isinstance(reply.json()["choices"], list)


@pytest.mark.parametrize(
    ("path", "kind"), [("/v1/chat/completions", "chat"), ("/v1/completions", "completion")]
)
def test_fuzzed_bodies_never_break_the_server(url: str, path: str, kind: str) -> None:
    seen: Counter[int] = Counter()
    with httpx2.Client(base_url=url, timeout=60, headers=AUTH) as http:

        @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(payload=bodies(kind))
        def fuzz(payload: Any) -> None:
            check_answer(http.post(path, content=json.dumps(payload).encode()), seen)

        @settings(max_examples=40, deadline=None, derandomize=True)
        @given(raw=st.binary(max_size=200) | st.text(max_size=100).map(str.encode))
        def fuzz_bytes(raw: bytes) -> None:
            check_answer(http.post(path, content=raw), seen)

        fuzz()
        fuzz_bytes()
        assert seen[200] >= 5 and seen[400] >= 50, seen  # both the generation path and refusals ran
        assert http.get("/health").status_code == 200
        ok = http.post("/v1/completions", json={"prompt": "still here?", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


TOKENIZE_FIELDS = st.sampled_from(["prompt", "messages", "model", "add_special_tokens", "return_token_strs"])


def test_fuzzed_tokenize_bodies(url: str) -> None:
    with httpx2.Client(base_url=url, timeout=60, headers=AUTH) as http:

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(payload=st.dictionaries(TOKENIZE_FIELDS | st.text(max_size=5), JUNK))
        def fuzz(payload: Any) -> None:
            reply = http.post("/tokenize", content=json.dumps(payload).encode())
            if reply.status_code != 200:
                assert_error_shape(reply.json(), reply.status_code)

        fuzz()


# --- the server itself, in process: TLS and a taken port ---


async def test_https_with_client_certificates(tmp_path: Path, tiny_llama_dir: Path) -> None:
    ca = Authority(tmp_path)
    server, client_pem = ca.issue("server", server=True), ca.issue("client", server=False)
    config = GatewayConfig(
        http_port=free_port(),
        tls_cert=str(server.cert),
        tls_key=str(server.key),
        tls_client_ca=str(ca.pem.cert),
    )
    tokenizer = await asyncio.to_thread(PromptTokenizer.load, MODEL, str(tiny_llama_dir))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}") as nowhere:  # no scheduler
        frontend = Frontend(scheduler_pb2_grpc.SchedulerStub(nowhere), config, KeyRing(), tokenizer)
        front = await HttpFront.start(frontend, config, 1.0, on_exit=lambda: None)
        try:
            base = f"https://127.0.0.1:{config.http_port}"
            trusted = ssl.create_default_context(cafile=str(ca.pem.cert))
            trusted.load_cert_chain(str(client_pem.cert), str(client_pem.key))
            async with httpx2.AsyncClient(base_url=base, verify=trusted) as c:
                assert (await c.get("/health")).json() == {"status": "ok"}
                ready = await c.get("/ready")
                assert ready.status_code == 503 and assert_error_shape(ready.json(), 503)
            anonymous = ssl.create_default_context(cafile=str(ca.pem.cert))
            async with httpx2.AsyncClient(base_url=base, verify=anonymous) as c:
                with pytest.raises(httpx2.TransportError):  # no client certificate: refused
                    await c.get("/health")
            with pytest.raises(OSError, match="cannot listen for HTTP"):
                await HttpFront.start(frontend, config, 1.0, on_exit=lambda: None)  # the port is taken
        finally:
            await front.stop()
