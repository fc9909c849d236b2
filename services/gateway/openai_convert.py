"""OpenAI-style JSON bodies into WiCore protos, and WiCore errors into OpenAI's error JSON.

This module owns the HTTP API's *shape*: which fields exist, their JSON types and
the ranges the protos can hold (pydantic, strict: `"0.5"` is not a number), and how
they map onto `GenerateRequest` / `ChatRequest`. What the values mean (top_p in
(0, 1], roles, stop strings, the gateway's limits) is checked by the `Frontend`,
through the same validation as gRPC; its errors come back through `api_error`,
which names the field as the client sent it (`top_p`, not `options.sampling.top_p`).

vLLM's `priority` (lower is sooner, 0 the default) maps onto the proto's enum:
0 = unset (normal), any positive value = LOW, -1 = HIGH, -2 or less = URGENT.
"""

from __future__ import annotations

import logging
import re
import reprlib
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

import grpc
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from wicore.errors import InvalidRequest, WicoreError
from wicore.gateway.validation import MAX_LOGPROBS
from wicore.v1 import inference_pb2

log = logging.getLogger(__name__)

UINT32_MAX = 2**32 - 1
INT32 = (-(2**31), 2**31 - 1)
MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # prompts x n in one completions request
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's limit

Uint32 = Annotated[int, Field(ge=0, le=UINT32_MAX)]


class _Body(BaseModel):
    """Strict JSON types; unknown fields are kept (and logged by `unknown_fields`), not refused."""

    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False


class ContentPart(_Body):
    type: str
    text: str | None = None


class MessageIn(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class _Options(_Body):
    """The fields chat and completions share (OpenAI's, then vLLM's extensions)."""

    model: str | None = None
    max_tokens: Uint32 | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = None
    stop: str | list[str] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    top_k: Annotated[int, Field(ge=INT32[0], le=INT32[1])] | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[Uint32] | None = None
    ignore_eos: bool = False
    priority: int = 0
    cache_salt: str | None = None
    # Known, but only their defaults are supported (anything else is refused, not ignored).
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class ChatBody(_Options):
    messages: list[MessageIn]
    max_completion_tokens: Uint32 | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionBody(_Options):
    prompt: str | list[Any]
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TokenizeBody(_Body):
    """vLLM's /tokenize: a `prompt`, or chat `messages` rendered by the model's template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[MessageIn] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False


# Fields accepted only at their defaults: name -> "is this value (in this body) the default?".
_DEFAULT_ONLY: dict[str, Callable[[Any, Any], bool]] = {
    "frequency_penalty": lambda v, b: not v,
    "presence_penalty": lambda v, b: not v,
    "logit_bias": lambda v, b: not v,
    "tools": lambda v, b: not v,
    "tool_choice": lambda v, b: v in (None, "none", "auto"),
    "response_format": lambda v, b: v is None or v.get("type") == "text",
    "echo": lambda v, b: not v,
    "suffix": lambda v, b: not v,
    "best_of": lambda v, b: v is None or v == b.n,
    "add_generation_prompt": lambda v, b: v,
}


@dataclass(frozen=True, slots=True)
class Call:
    """One HTTP request as Frontend calls: one proto per choice, and how to answer."""

    response_id: str
    requests: list[Any]  # ChatRequest or GenerateRequest, one per choice
    prompt_of: list[int]  # choice -> index of its prompt (usage counts each prompt once)
    stream: bool
    include_usage: bool
    logprobs: int | None  # None: no logprobs; else the number of alternatives per token
    renames: Mapping[str, str] = field(default_factory=dict)  # Frontend field -> OpenAI param


class ApiError(Exception):
    """An error answered as OpenAI's `{"error": {message, type, param, code}}` with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or _CODES.get(status)

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
_CODES = {
    401: "invalid_api_key",
    404: "not_found",
    413: "request_too_large",
    429: "rate_limit_exceeded",
    500: "internal_error",
    503: "service_unavailable",
    504: "timeout",
}
_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.FAILED_PRECONDITION: 503,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.CANCELLED: 503,
    grpc.StatusCode.ABORTED: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w.\[\]]*): (.*)$", re.DOTALL)


def api_error(exc: WicoreError | grpc.aio.AioRpcError, renames: Mapping[str, str] | None = None) -> ApiError:
    """The HTTP answer to a domain error or a downstream gRPC failure.

    Messages of the form "field: problem" name `param` (in OpenAI's terms). Two codes
    depend on that: RESOURCE_EXHAUSTED naming a field (a prompt plus max_tokens beyond
    the context) is the client's to fix, 400 `context_length_exceeded`, not a 429 to
    retry; FAILED_PRECONDITION naming one (no chat template) is 400, else 503."""
    if isinstance(exc, grpc.aio.AioRpcError):
        code, message = exc.code(), exc.details() or exc.code().name
    else:
        code, message = exc.code, str(exc)
    status = _STATUS.get(code, 500)
    match = _FIELD_PREFIX.match(message)
    if status == 401 or not match:
        return ApiError(status, message)
    param = openai_param(match[1], renames or {})
    if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION):
        status = 400
    extra = "context_length_exceeded" if code == grpc.StatusCode.RESOURCE_EXHAUSTED else None
    if code == grpc.StatusCode.NOT_FOUND and param == "model":
        extra = "model_not_found"
    return ApiError(status, f"{param}: {match[2]}", param, extra)


def openai_param(name: str, renames: Mapping[str, str]) -> str:
    """A Frontend field name as the HTTP client spelled it."""
    name = name.removeprefix("options.").removeprefix("sampling.")
    name = re.sub(r"^stop\[\d+\]$", "stop", name)
    return renames.get(name, name)


def validation_error(exc: ValidationError) -> ApiError:
    """A 400 naming the first bad field; a union's alternatives are reported together."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {first['msg']}", None, "invalid_json")
    if not first["loc"]:
        return ApiError(400, f"the body must be a JSON object: {first['msg']}")
    same = [e for e in errors if e["loc"][:1] == first["loc"][:1]]
    loc = _common_prefix([e["loc"] for e in same])
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    problems = list(dict.fromkeys(str(e["msg"]) for e in same))
    return ApiError(400, f"{param}: {'; or '.join(problems)}", param)


def _common_prefix(locs: Sequence[tuple[int | str, ...]]) -> tuple[int | str, ...]:
    prefix = locs[0]
    for loc in locs[1:]:
        n = 0
        while n < min(len(prefix), len(loc)) and prefix[n] == loc[n]:
            n += 1
        prefix = prefix[:n]
    return prefix


B = TypeVar("B", bound=_Body)


def parse_body(raw: bytes, model: type[B], where: str) -> B:
    """`raw` as `model`, or a 400; logs (and ignores) fields it does not know."""
    try:
        body = model.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_error(exc) from None
    unknown = unknown_fields(body)
    if unknown:
        log.warning("%s: ignoring unknown fields %s", where, _loggable(unknown))
    for name, is_default in _DEFAULT_ONLY.items():
        value = getattr(body, name, None)
        if name in body.model_fields_set and not is_default(value, body):
            got = reprlib.repr(value)
            raise ApiError(400, f"{name}: is not supported by this server (got {got})", name)
    return body


def _loggable(names: list[str], most: int = 10) -> str:
    """Client-chosen names for a log line: odd ones quoted (no control characters), long
    ones cut, at most `most` of them."""
    shown = [n if n.isascii() and n.isprintable() and len(n) <= 64 else ascii(n[:64]) for n in names[:most]]
    return ", ".join(shown) + (f" and {len(names) - most} more" if len(names) > most else "")


def unknown_fields(body: BaseModel, at: str = "") -> list[str]:
    """Dotted names of the fields (at any depth) that `body`'s models do not declare."""
    found = [f"{at}{name}" for name in body.model_extra or {}]
    for name in type(body).model_fields:
        value = getattr(body, name)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, BaseModel):
                index = f"[{i}]" if isinstance(value, list) else ""
                found += unknown_fields(item, f"{at}{name}{index}.")
    return found


def priority_of(value: int) -> inference_pb2.Priority.ValueType:
    """vLLM's priority (lower = sooner, 0 = default) as the proto's enum (see the module doc)."""
    if value == 0:
        return inference_pb2.PRIORITY_UNSPECIFIED
    if value > 0:
        return inference_pb2.PRIORITY_LOW
    return inference_pb2.PRIORITY_HIGH if value == -1 else inference_pb2.PRIORITY_URGENT


def options_proto(
    body: _Options, max_tokens: int | None, logprobs: int | None
) -> inference_pb2.GenerateRequest:
    """Everything but the prompt, as `GenerateRequest` fields (unset stays unset)."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or ())
    request = inference_pb2.GenerateRequest(
        model=body.model or "",
        stop=stop,
        stop_token_ids=body.stop_token_ids or (),
        ignore_eos=body.ignore_eos,
        priority=priority_of(body.priority),
        cache_salt=body.cache_salt or "",
    )
    if max_tokens is not None:
        request.max_tokens = max_tokens
    if logprobs is not None:
        request.logprobs = logprobs
    sampling = request.sampling
    for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
        if getattr(body, name) is not None:
            setattr(sampling, name, getattr(body, name))
    if body.top_k is not None:
        sampling.top_k = 0 if body.top_k == -1 else body.top_k  # vLLM's -1 = disabled
    if body.seed is not None:
        sampling.seed = body.seed % 2**64  # a negative seed, as its two's complement
    return request


def _per_choice(options: inference_pb2.GenerateRequest, response_id: str, i: int, n: int) -> None:
    """Choice i's own request id, and seed + i: seeded choices differ from each other, reproducibly."""
    options.request_id = f"{response_id}-{i}"
    if n > 1 and options.sampling.HasField("seed"):
        options.sampling.seed = (options.sampling.seed + (i % n)) % 2**64


def _stream_flags(body: _Options) -> tuple[bool, bool]:
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options: only allowed when stream is true", "stream_options")
    return body.stream, bool(body.stream_options and body.stream_options.include_usage)


def chat_messages(messages: Sequence[MessageIn], at: str = "messages") -> list[inference_pb2.ChatMessage]:
    """OpenAI messages as protos: text parts joined by newlines (as vLLM does), `developer` = system."""
    out = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                where = f"{at}[{i}].content[{j}]"
                if part.type != "text":
                    raise ApiError(
                        400,
                        f"{where}.type: only 'text' parts are supported, got {part.type!r}",
                        f"{where}.type",
                    )
                if part.text is None:
                    raise ApiError(400, f"{where}.text: is required in a text part", f"{where}.text")
                texts.append(part.text)
            content = "\n".join(texts)
        role = "system" if message.role == "developer" else message.role
        out.append(inference_pb2.ChatMessage(role=role, content=content or ""))
    return out


def chat_call(raw: bytes) -> Call:
    """A `/v1/chat/completions` body as n `ChatRequest`s."""
    body = parse_body(raw, ChatBody, "/v1/chat/completions")
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs: needs logprobs set to true", "top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    tokens_name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    stream, include_usage = _stream_flags(body)
    messages = chat_messages(body.messages)
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    requests = []
    for i in range(body.n):
        options = options_proto(body, max_tokens, logprobs)
        _per_choice(options, response_id, i, body.n)
        requests.append(inference_pb2.ChatRequest(messages=messages, options=options))
    renames = {"logprobs": "top_logprobs", "max_tokens": tokens_name}
    return Call(response_id, requests, [0] * body.n, stream, include_usage, logprobs, renames)


def completion_call(raw: bytes) -> Call:
    """A `/v1/completions` body as one `GenerateRequest` per prompt and choice (prompt-major)."""
    body = parse_body(raw, CompletionBody, "/v1/completions")
    prompts = _prompts(body.prompt)
    if len(prompts) * body.n > MAX_CHOICES:
        raise ApiError(400, f"n: {len(prompts)} prompts x n={body.n} exceeds {MAX_CHOICES} choices", "n")
    stream, include_usage = _stream_flags(body)
    response_id = f"cmpl-{uuid.uuid4().hex}"
    requests, prompt_of = [], []
    for p, prompt in enumerate(prompts):
        for i in range(body.n):
            options = options_proto(body, body.max_tokens, body.logprobs)
            options.prompt = prompt
            _per_choice(options, response_id, p * body.n + i, body.n)
            requests.append(options)
            prompt_of.append(p)
    return Call(response_id, requests, prompt_of, stream, include_usage, body.logprobs)


def _prompts(prompt: str | list[Any]) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidRequest("prompt", "must not be an empty list")
    for i, item in enumerate(prompt):
        if isinstance(item, int | list):
            raise InvalidRequest("prompt", "token-id prompts are not supported; send text")
        if not isinstance(item, str):
            raise InvalidRequest(f"prompt[{i}]", f"must be a string, got {type(item).__name__}")
    return list(prompt)
