"""The OpenAI JSON <-> proto conversion of the HTTP API: requests into protos (shape
checks here, meaning through the gateway's own validation), errors into OpenAI's
error JSON, and stream deltas into OpenAI's responses."""

from __future__ import annotations

import json
import logging
from typing import Any

import grpc
import pytest

from wicore.config import GatewayConfig
from wicore.errors import InvalidRequest, ModelNotFound, Overloaded, Unauthenticated
from wicore.gateway.openai_convert import (
    MAX_CHOICES,
    ApiError,
    api_error,
    chat_call,
    completion_call,
    priority_of,
)
from wicore.gateway.openai_render import MIN_LOGPROB, Renderer, TokenText, dumps, hf_token_bytes
from wicore.gateway.validation import validate_chat, validate_generate
from wicore.v1 import inference_pb2 as pb

from tiny_models import build_tokenizer

LIMITS = GatewayConfig()


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def chat(**fields: Any) -> bytes:
    return body(messages=[{"role": "user", "content": "hi"}], **fields)


def rejected(raw: bytes, parse: Any = chat_call) -> ApiError:
    with pytest.raises(ApiError) as err:
        parse(raw)
    assert err.value.status == 400
    return err.value


def gateway_says(request: pb.ChatRequest | pb.GenerateRequest, renames: Any) -> ApiError:
    """What the HTTP client is told when the gateway's validation refuses `request`."""
    with pytest.raises(InvalidRequest) as err:
        if isinstance(request, pb.ChatRequest):
            validate_chat(request, LIMITS)
        else:
            validate_generate(request, LIMITS)
    return api_error(err.value, renames)


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def test_chat_fields_map_onto_the_proto() -> None:
    call = chat_call(
        body(
            model="m",
            messages=[
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None},
            ],
            max_tokens=5,
            max_completion_tokens=7,
            temperature=0.5,
            top_p=0.9,
            top_k=-1,
            min_p=0.1,
            repetition_penalty=1.2,
            seed=-1,
            stop="END",
            stop_token_ids=[3],
            ignore_eos=True,
            priority=-1,
            cache_salt="s",
            logprobs=True,
            top_logprobs=3,
            user="u",
        )
    )
    (request,) = call.requests
    assert [(m.role, m.content) for m in request.messages] == [
        ("system", "be brief"),
        ("user", "a\nb"),
        ("assistant", ""),
    ]
    o = request.options
    assert (o.model, o.max_tokens, list(o.stop), list(o.stop_token_ids), o.ignore_eos) == (
        "m",
        7,
        ["END"],
        [3],
        True,
    )
    assert o.sampling.top_k == 0 and o.sampling.seed == 2**64 - 1  # vLLM's -1 = off; two's complement
    assert o.sampling.temperature == pytest.approx(0.5) and o.sampling.min_p == pytest.approx(0.1)
    assert (o.priority, o.cache_salt, o.logprobs) == (pb.PRIORITY_HIGH, "s", 3)
    assert o.request_id == f"{call.response_id}-0" and call.response_id.startswith("chatcmpl-")
    assert not call.stream and call.logprobs == 3


def test_unset_fields_stay_unset() -> None:
    (request,) = chat_call(chat()).requests
    o = request.options
    assert not o.HasField("max_tokens") and not o.HasField("logprobs")
    assert not any(o.sampling.HasField(f) for f in ("temperature", "top_p", "top_k", "seed", "min_p"))
    assert o.priority == pb.PRIORITY_UNSPECIFIED
    assert chat_call(chat(logprobs=True)).requests[0].options.logprobs == 0
    assert chat_call(chat(logprobs=True)).requests[0].options.HasField("logprobs")


def test_n_choices_get_their_own_ids_and_seeds() -> None:
    call = chat_call(chat(n=3, seed=10))
    assert [r.options.sampling.seed for r in call.requests] == [10, 11, 12]
    assert len({r.options.request_id for r in call.requests}) == 3
    unseeded = chat_call(chat(n=2))
    assert not any(r.options.sampling.HasField("seed") for r in unseeded.requests)


def test_completion_prompts_times_n_are_prompt_major() -> None:
    call = completion_call(body(prompt=["a", "b"], n=2, logprobs=2, stream=True))
    assert [r.prompt for r in call.requests] == ["a", "a", "b", "b"]
    assert call.prompt_of == [0, 0, 1, 1] and call.logprobs == 2 and call.stream
    assert call.response_id.startswith("cmpl-")
    assert completion_call(body(prompt="x")).requests[0].prompt == "x"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, pb.PRIORITY_UNSPECIFIED), (5, pb.PRIORITY_LOW), (-1, pb.PRIORITY_HIGH), (-9, pb.PRIORITY_URGENT)],
)
def test_priority_follows_vllm_lower_is_sooner(value: int, expected: int) -> None:
    assert priority_of(value) == expected


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (chat(temperature="0.5"), "temperature"),
        (chat(max_tokens=-1), "max_tokens"),
        (chat(max_tokens=2**32), "max_tokens"),
        (chat(n=0), "n"),
        (chat(n=17), "n"),
        (chat(n=True), "n"),
        (chat(stream="yes"), "stream"),
        (chat(stop=5), "stop"),
        (chat(stop=["a", 1]), "stop"),
        (chat(seed=2**64), "seed"),
        (chat(top_logprobs=21, logprobs=True), "top_logprobs"),
        (chat(top_logprobs=2), "top_logprobs"),
        (chat(stream_options={"include_usage": True}), "stream_options"),
        (chat(frequency_penalty=0.5), "frequency_penalty"),
        (chat(tools=[{"type": "function"}]), "tools"),
        (body(messages="hi"), "messages"),
        (body(messages=[{"content": "hi"}]), "messages[0].role"),
        (body(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
        (
            body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
            "messages[0].content[0].type",
        ),
        (body(model="m"), "messages"),
    ],
)
def test_wrong_shapes_are_400_naming_the_field(raw: bytes, param: str) -> None:
    error = rejected(raw)
    assert error.param == param, error.message
    assert error.message.startswith(f"{param}: ")
    assert error.body()["error"]["type"] == "invalid_request_error"


def test_not_json_or_not_an_object_is_400() -> None:
    assert rejected(b'{"messages": [').code == "invalid_json"
    assert rejected(b'"\\ud800"').code == "invalid_json"  # a lone surrogate
    assert rejected(b"\xff\xfe").code == "invalid_json"
    assert rejected(b"[1, 2]").param is None
    assert rejected(b"[" * 5000 + b"]" * 5000).status == 400


def test_defaults_of_unsupported_fields_are_accepted() -> None:
    chat_call(chat(frequency_penalty=0, presence_penalty=0.0, logit_bias={}, tools=[], tool_choice="none"))
    completion_call(body(prompt="x", echo=False, best_of=2, n=2, suffix=None))
    assert rejected(body(prompt="x", echo=True), completion_call).param == "echo"
    assert rejected(body(prompt="x", best_of=3), completion_call).param == "best_of"


def test_completion_prompt_shapes() -> None:
    with pytest.raises(InvalidRequest, match="token-id prompts are not supported"):
        completion_call(body(prompt=[1, 2, 3]))
    with pytest.raises(InvalidRequest, match="prompt: must not be an empty list"):
        completion_call(body(prompt=[]))
    with pytest.raises(InvalidRequest, match=r"prompt\[1\]: must be a string"):
        completion_call(body(prompt=["a", {"x": 1}]))
    assert rejected(body(prompt=["a"] * 5, n=16), completion_call).param == "n"
    assert len(completion_call(body(prompt=["a"] * 4, n=16)).requests) == MAX_CHOICES
    assert rejected(body(prompt="x", logprobs=6), completion_call).param == "logprobs"


def test_unknown_fields_are_logged_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "wicore.gateway.openai_convert"):
        call = chat_call(
            body(messages=[{"role": "user", "content": "hi", "x_mood": 1}], guided_json={}, temperature=0)
        )
    assert call.requests[0].options.sampling.temperature == 0
    assert "ignoring unknown fields guided_json, messages[0].x_mood" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, "wicore.gateway.openai_convert"):
        chat_call(
            body(
                messages=[{"role": "user", "content": "hi"}],
                **{"a\nFAKE LOG LINE": 1},
                **dict.fromkeys("bcdefghijkl", 0),
            )
        )
    assert (
        "'a\\nFAKE LOG LINE'" in caplog.text and "and 2 more" in caplog.text and "\nFAKE" not in caplog.text
    )


def test_gateway_validation_errors_name_openai_params() -> None:
    call = chat_call(chat(top_p=1.5))
    error = gateway_says(call.requests[0], call.renames)
    assert (error.status, error.param) == (400, "top_p")
    assert error.message == "top_p: must be in (0, 1], got 1.5"
    call = chat_call(chat(max_completion_tokens=0))
    assert gateway_says(call.requests[0], call.renames).param == "max_completion_tokens"
    call = chat_call(chat(max_tokens=0))
    assert gateway_says(call.requests[0], call.renames).param == "max_tokens"
    call = chat_call(body(messages=[{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]))
    assert gateway_says(call.requests[0], call.renames).param == "messages[1].role"
    call = chat_call(chat(stop=["a", ""]))
    assert gateway_says(call.requests[0], call.renames).param == "stop"
    call = completion_call(body(prompt="x", top_k=-5))
    assert gateway_says(call.requests[0], call.renames).param == "top_k"
    call = completion_call(body(prompt=""))
    assert gateway_says(call.requests[0], call.renames).param == "prompt"
    assert gateway_says(chat_call(body(messages=[])).requests[0], {}).param == "messages"


@pytest.mark.parametrize(
    ("error", "status", "param", "code"),
    [
        (Unauthenticated("authorization: missing or unknown API key"), 401, None, "invalid_api_key"),
        (ModelNotFound("model: 'x' is not served here"), 404, "model", "model_not_found"),
        (Overloaded("the gateway is at its limit of 2 requests"), 429, None, "rate_limit_exceeded"),
        (rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "the scheduler's queue is full"), 429, None, None),
        (
            rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "max_tokens: the prompt plus max_tokens exceeds"),
            400,
            "max_tokens",
            "context_length_exceeded",
        ),
        (rpc_error(grpc.StatusCode.UNAVAILABLE, "no worker is registered"), 503, None, "service_unavailable"),
        (rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"), 504, None, "timeout"),
        (rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "messages: no chat template"), 400, "messages", None),
        (rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "shutting down"), 503, None, None),
        (rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p: bad"), 400, "top_p", None),
        (rpc_error(grpc.StatusCode.INTERNAL, "boom"), 500, None, "internal_error"),
    ],
)
def test_status_codes(error: Exception, status: int, param: str | None, code: str | None) -> None:
    answer = api_error(error)  # type: ignore[arg-type]
    assert (answer.status, answer.param) == (status, param)
    if code is not None:
        assert answer.code == code
    assert set(answer.body()["error"]) == {"message", "type", "param", "code"}


def delta(
    text: str,
    ids: list[int],
    finish: int = 0,
    logprobs: list[pb.TokenLogprob] | None = None,
    usage: pb.Usage | None = None,
) -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(
        text=text, token_ids=ids, finish_reason=finish, logprobs=logprobs or [], usage=usage
    )


TEXT = TokenText(lambda i: {1: b"he", 2: b"llo", 3: b"!", 4: "é".encode(), 5: b"\xc3"}[i])


def entry(token: int, logprob: float, *top: tuple[int, float]) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=token, logprob=logprob, top=[pb.TopLogprob(token_id=t, logprob=p) for t, p in top]
    )


def test_chat_response_with_n_and_logprobs() -> None:
    call = chat_call(
        chat(n=2, logprobs=True, top_logprobs=1, stream=True, stream_options={"include_usage": True})
    )
    r = Renderer(call, chat=True, model="tiny", token_text=TEXT)
    roles = r.role_chunks()
    assert [c["choices"][0]["delta"] for c in roles] == [{"role": "assistant", "content": ""}] * 2
    assert all(c["object"] == "chat.completion.chunk" and c["usage"] is None for c in roles)
    chunk = r.add(1, delta("he", [1], logprobs=[entry(1, -0.5, (1, -0.5))]))
    assert chunk is not None and chunk["choices"][0]["index"] == 1
    assert chunk["choices"][0]["logprobs"]["content"][0] == {
        "token": "he",
        "logprob": -0.5,
        "bytes": [104, 101],
        "top_logprobs": [{"token": "he", "logprob": -0.5, "bytes": [104, 101]}],
    }
    assert r.add(0, delta("", [])) is None
    usage0 = pb.Usage(prompt_tokens=10, completion_tokens=2, cached_tokens=8)
    usage1 = pb.Usage(prompt_tokens=10, completion_tokens=1, cached_tokens=0)
    done = r.add(
        0, delta("é", [4, 4], pb.FINISH_REASON_LENGTH, [entry(4, float("-inf")), entry(4, -1.0)], usage0)
    )
    assert done is not None and done["choices"][0]["finish_reason"] == "length"
    r.add(1, delta("", [], pb.FINISH_REASON_STOP, usage=usage1))
    final = r.usage_chunk()
    assert final["choices"] == []
    assert final["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 3,
        "total_tokens": 13,
        "prompt_tokens_details": {"cached_tokens": 8},
    }
    whole = r.response()
    assert whole["object"] == "chat.completion" and whole["model"] == "tiny"
    assert [c["message"] for c in whole["choices"]] == [
        {"role": "assistant", "content": "é"},
        {"role": "assistant", "content": "he"},
    ]
    assert [c["finish_reason"] for c in whole["choices"]] == ["length", "stop"]
    assert whole["choices"][0]["logprobs"]["content"][0]["logprob"] == MIN_LOGPROB  # -inf has no JSON
    json.loads(dumps(whole))  # strict JSON (no NaN, no Infinity)


def test_completion_logprobs_are_the_legacy_shape() -> None:
    call = completion_call(body(prompt=["p", "q"], logprobs=1))
    r = Renderer(call, chat=False, model="tiny", token_text=TEXT)
    chunk = r.add(0, delta("hello", [1, 2], logprobs=[entry(1, -1.0, (3, -0.5)), entry(2, -2.0, (2, -2.0))]))
    assert (
        chunk is not None and chunk["object"] == "text_completion" and chunk["choices"][0]["text"] == "hello"
    )
    r.add(0, delta("!", [3], pb.FINISH_REASON_STOP, [entry(3, -0.25, (3, -0.25))], pb.Usage(prompt_tokens=2)))
    r.add(1, delta("", [], pb.FINISH_REASON_STOP, usage=pb.Usage(prompt_tokens=3, completion_tokens=0)))
    first = r.response()["choices"][0]
    assert first["text"] == "hello!"
    assert first["logprobs"] == {
        "tokens": ["he", "llo", "!"],
        "token_logprobs": [-1.0, -2.0, -0.25],
        "top_logprobs": [{"!": -0.5, "he": -1.0}, {"llo": -2.0}, {"!": -0.25}],  # the sampled token too
        "text_offset": [0, 2, 5],
    }
    assert r.usage()["prompt_tokens"] == 5  # two prompts, each counted once


def test_responses_without_logprobs_say_null() -> None:
    r = Renderer(completion_call(body(prompt="p")), chat=False, model="m", token_text=TEXT)
    chunk = r.add(
        0, delta("he", [1], pb.FINISH_REASON_STOP, usage=pb.Usage(prompt_tokens=1, completion_tokens=1))
    )
    assert chunk is not None and chunk["choices"][0]["logprobs"] is None and "usage" not in chunk
    assert r.response()["choices"][0]["logprobs"] is None


def test_completion_offsets_count_characters_across_split_bytes() -> None:
    r = Renderer(completion_call(body(prompt="p", logprobs=0)), chat=False, model="m", token_text=TEXT)
    r.add(0, delta("hé", [1, 5], logprobs=[entry(1, -1.0), entry(5, -1.0)]))  # é split: b"\xc3" ...
    r.add(0, delta("!", [3], pb.FINISH_REASON_STOP, [entry(3, -1.0)], pb.Usage()))
    logprobs = r.response()["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["he", "bytes:\\xc3", "!"]
    assert logprobs["text_offset"] == [0, 2, 2]  # the lone byte is no character yet


def test_token_bytes_rebuild_the_text_of_a_byte_level_tokenizer() -> None:
    tokenizer = build_tokenizer()
    text = TokenText(hf_token_bytes(tokenizer))
    sample = "Héllo wörld 你好 🙂 <|im_end|> def add(a, b):"
    ids = tokenizer.encode(sample, add_special_tokens=False)
    pieces = [text(i) for i in ids]
    assert b"".join(raw for _, raw in pieces).decode() == sample
    assert any(token.startswith("bytes:") for token, _ in pieces)  # a character split across tokens
    assert ("<|im_end|>", b"<|im_end|>") in pieces
