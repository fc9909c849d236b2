"""Validation of the public API's requests. Every failure names its field.

Checks that need the model's context (prompt + max_tokens) happen on the
worker; its error reaches the client as is.
"""

from __future__ import annotations

import math

from wicore.config import GatewayConfig
from wicore.errors import InvalidRequest
from wicore.gateway.prompts import ROLES
from wicore.v1 import inference_pb2
from wicore.workload import parse_workload_type

MAX_REQUEST_ID_CHARS = 128
MAX_MODEL_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20
MAX_CACHE_SALT_CHARS = 256


def validate_generate(request: inference_pb2.GenerateRequest, limits: GatewayConfig) -> None:
    if not request.prompt:
        raise InvalidRequest("prompt", "must not be empty")
    if len(request.prompt) > limits.max_prompt_chars:
        raise InvalidRequest(
            "prompt", f"is {len(request.prompt)} characters; the limit is {limits.max_prompt_chars}"
        )
    _check_options(request, limits, "")


def validate_chat(request: inference_pb2.ChatRequest, limits: GatewayConfig) -> None:
    if not request.messages:
        raise InvalidRequest("messages", "must hold at least one message")
    if len(request.messages) > limits.max_messages:
        raise InvalidRequest(
            "messages", f"has {len(request.messages)} messages; the limit is {limits.max_messages}"
        )
    chars = 0
    for i, message in enumerate(request.messages):
        if message.role not in ROLES:
            raise InvalidRequest(
                f"messages[{i}].role", f"must be one of {', '.join(ROLES)}, got {message.role!r}"
            )
        chars += len(message.content)
    if chars > limits.max_prompt_chars:
        raise InvalidRequest(
            "messages", f"hold {chars} characters of content; the limit is {limits.max_prompt_chars}"
        )
    if request.options.prompt:
        raise InvalidRequest("options.prompt", "must be empty in a chat request: the messages are the prompt")
    _check_options(request.options, limits, "options.")


def _check_options(request: inference_pb2.GenerateRequest, limits: GatewayConfig, at: str) -> None:
    """Every field of a completion's options but the prompt; `at` prefixes the field names."""
    _check_model(request.model, at)
    if request.HasField("max_tokens") and request.max_tokens == 0:
        raise InvalidRequest(f"{at}max_tokens", "must be at least 1 (leave it unset for the server default)")
    _check_sampling(request.sampling, at)
    if len(request.stop) > limits.max_stop_strings:
        raise InvalidRequest(
            f"{at}stop", f"has {len(request.stop)} strings; the limit is {limits.max_stop_strings}"
        )
    for i, stop in enumerate(request.stop):
        if not stop:
            raise InvalidRequest(f"{at}stop[{i}]", "must not be empty")
        if len(stop) > limits.max_stop_chars:
            raise InvalidRequest(f"{at}stop[{i}]", f"is longer than {limits.max_stop_chars} characters")
    if len(request.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequest(f"{at}stop_token_ids", f"has more than {MAX_STOP_TOKEN_IDS} ids")
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest(f"{at}request_id", f"is longer than {MAX_REQUEST_ID_CHARS} characters")
    if request.priority not in inference_pb2.Priority.values():
        known = ", ".join(inference_pb2.Priority.keys())
        raise InvalidRequest(f"{at}priority", f"unknown value {request.priority} (known: {known})")
    parse_workload_type(request.workload_type, f"{at}workload_type")
    if request.HasField("logprobs") and request.logprobs > MAX_LOGPROBS:
        raise InvalidRequest(f"{at}logprobs", f"must be at most {MAX_LOGPROBS}, got {request.logprobs}")
    if len(request.cache_salt) > MAX_CACHE_SALT_CHARS:
        raise InvalidRequest(f"{at}cache_salt", f"is longer than {MAX_CACHE_SALT_CHARS} characters")


def validate_tokenize(request: inference_pb2.TokenizeRequest, limits: GatewayConfig) -> None:
    _check_model(request.model, "")
    if len(request.text) > limits.max_prompt_chars:
        raise InvalidRequest(
            "text", f"is {len(request.text)} characters; the limit is {limits.max_prompt_chars}"
        )


def _check_model(model: str, at: str) -> None:
    if len(model) > MAX_MODEL_CHARS:
        raise InvalidRequest(f"{at}model", f"is longer than {MAX_MODEL_CHARS} characters")


def _check_sampling(sampling: inference_pb2.SamplingParams, at: str) -> None:
    if sampling.HasField("temperature"):
        t = sampling.temperature
        if not math.isfinite(t) or t < 0:
            raise InvalidRequest(f"{at}sampling.temperature", f"must be a finite number >= 0, got {t}")
    if sampling.HasField("top_p"):
        p = sampling.top_p
        if not (math.isfinite(p) and 0 < p <= 1):
            raise InvalidRequest(f"{at}sampling.top_p", f"must be in (0, 1], got {p}")
    if sampling.HasField("top_k") and sampling.top_k < 0:
        raise InvalidRequest(f"{at}sampling.top_k", f"must be >= 0 (0 disables it), got {sampling.top_k}")
    if sampling.HasField("min_p"):
        m = sampling.min_p
        if not (math.isfinite(m) and 0 <= m <= 1):
            raise InvalidRequest(f"{at}sampling.min_p", f"must be in [0, 1], got {m}")
    if sampling.HasField("repetition_penalty"):
        r = sampling.repetition_penalty
        if not (math.isfinite(r) and r > 0):
            raise InvalidRequest(f"{at}sampling.repetition_penalty", f"must be a finite number > 0, got {r}")
