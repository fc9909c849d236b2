"""Protobuf <-> engine types, for the worker's servicer only."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from wicore.errors import InvalidRequest, Overloaded
from wicore.kv.hashing import BlockHash, validate_block_hash
from wicore.v1 import inference_pb2, worker_pb2
from wicore.worker.engine_types import EngineRequest, FinishReason, SamplingParams
from wicore.worker.model_runner import text_config
from wicore.worker.output import Delta

FINISH_TO_PROTO = {
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: inference_pb2.FINISH_REASON_UNSPECIFIED,
}


@dataclass(frozen=True, slots=True)
class ModelDefaults:
    """What "unset" means for this model: its generation_config, else greedy."""

    sampling: SamplingParams
    eos_token_ids: frozenset[int]
    max_context: int
    default_max_tokens: int
    vocab_size: int = 0  # 0: unknown

    @classmethod
    def from_model(cls, model: Any, default_max_tokens: int) -> ModelDefaults:
        gen = model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else model.config.eos_token_id
        eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        penalty = float(gen.repetition_penalty or 1.0)
        if gen.do_sample:
            sampling = SamplingParams(
                temperature=float(gen.temperature or 1.0),
                top_p=float(gen.top_p or 1.0),
                top_k=int(gen.top_k or 0),
                min_p=float(gen.min_p or 0.0),
                repetition_penalty=penalty,
            )
        else:
            sampling = SamplingParams(repetition_penalty=penalty)
        max_context = int(getattr(text_config(model), "max_position_embeddings", 0) or 2048)
        vocab_size = int(getattr(text_config(model), "vocab_size", 0) or 0)
        return cls(sampling, eos_ids, max_context, default_max_tokens, vocab_size)


def sampling_from_proto(msg: inference_pb2.SamplingParams, defaults: SamplingParams) -> SamplingParams:
    try:
        return SamplingParams(
            temperature=msg.temperature if msg.HasField("temperature") else defaults.temperature,
            top_p=msg.top_p if msg.HasField("top_p") else defaults.top_p,
            top_k=msg.top_k if msg.HasField("top_k") else defaults.top_k,
            min_p=msg.min_p if msg.HasField("min_p") else defaults.min_p,
            repetition_penalty=(
                msg.repetition_penalty if msg.HasField("repetition_penalty") else defaults.repetition_penalty
            ),
            seed=msg.seed if msg.HasField("seed") else None,
        )
    except ValueError as exc:
        raise InvalidRequest("sampling", str(exc)) from None


def engine_request(
    request: inference_pb2.GenerateRequest,
    prompt_ids: list[int],
    defaults: ModelDefaults,
    block_hashes: list[BlockHash] | None = None,
) -> EngineRequest:
    room = defaults.max_context - len(prompt_ids)
    if request.HasField("max_tokens"):
        if request.max_tokens > room:
            raise Overloaded(
                f"max_tokens: the prompt ({len(prompt_ids)} tokens) plus max_tokens ({request.max_tokens}) "
                f"exceeds the model's context of {defaults.max_context} tokens"
            )
        max_new = request.max_tokens
    else:
        if room < 1:
            raise Overloaded(
                f"prompt: {len(prompt_ids)} tokens leave no room in the model's context "
                f"of {defaults.max_context} tokens"
            )
        max_new = min(defaults.default_max_tokens, room)
    stop_ids = frozenset(request.stop_token_ids)
    if not request.ignore_eos:
        stop_ids |= defaults.eos_token_ids
    return EngineRequest(
        request_id=request.request_id,
        prompt_token_ids=prompt_ids,
        max_new_tokens=max_new,
        sampling=sampling_from_proto(request.sampling, defaults.sampling),
        stop_token_ids=stop_ids,
        logprobs=request.logprobs if request.HasField("logprobs") else None,
        cache_salt=request.cache_salt,
        block_hashes=block_hashes or [],
    )


def from_tokenized(
    msg: worker_pb2.TokenizedRequest, defaults: ModelDefaults, fingerprint: str, block_size: int
) -> tuple[EngineRequest, int]:
    """The engine request for `msg`, and how many of its prompt's last tokens are output the
    client already has (a resumed request; 0 otherwise)."""
    prompt_ids = list(msg.prompt_token_ids)
    if not prompt_ids:
        raise InvalidRequest("prompt_token_ids", "must not be empty")
    _check_ids(prompt_ids, "prompt_token_ids", defaults)
    hashes = _usable_hashes(msg, len(prompt_ids), fingerprint, block_size)
    generated = list(msg.generated_token_ids)
    if not generated:
        return engine_request(msg.request, prompt_ids, defaults, hashes), 0
    return resumed_request(msg.request, prompt_ids, generated, defaults, hashes), len(generated)


def _check_ids(ids: list[int], field: str, defaults: ModelDefaults) -> None:
    if defaults.vocab_size and max(ids) >= defaults.vocab_size:
        raise InvalidRequest(field, f"ids must be below the vocabulary size {defaults.vocab_size}")


def _usable_hashes(
    msg: worker_pb2.TokenizedRequest, num_tokens: int, fingerprint: str, block_size: int
) -> list[BlockHash]:
    """The scheduler's hashes of the prompt's blocks, if they were made for this model and
    block size (else none: the engine hashes the prompt itself)."""
    if not msg.block_hashes or (msg.fingerprint, msg.block_size) != (fingerprint, block_size):
        return []
    if len(msg.block_hashes) > num_tokens // block_size:
        raise InvalidRequest("block_hashes", f"has more hashes than the prompt has blocks of {block_size}")
    return [validate_block_hash(h, f"block_hashes[{i}]") for i, h in enumerate(msg.block_hashes)]


def resumed_request(
    request: inference_pb2.GenerateRequest,
    prompt_ids: list[int],
    generated: list[int],
    defaults: ModelDefaults,
    block_hashes: list[BlockHash] | None = None,
) -> EngineRequest:
    """The engine request that continues `request` after `generated` tokens were streamed."""
    _check_ids(generated, "generated_token_ids", defaults)
    base = engine_request(request, prompt_ids, defaults, block_hashes)
    remaining = base.max_new_tokens - len(generated)
    if remaining < 1:
        raise InvalidRequest(
            "generated_token_ids", f"{len(generated)} tokens already reach max_tokens ({base.max_new_tokens})"
        )
    return dataclasses.replace(base, prompt_token_ids=prompt_ids + generated, max_new_tokens=remaining)


def delta_to_proto(delta: Delta, request_id: str, model_id: str) -> inference_pb2.GenerateStreamResponse:
    msg = inference_pb2.GenerateStreamResponse(
        request_id=request_id, text=delta.text, token_ids=delta.token_ids, model=model_id
    )
    for lp in delta.logprobs:
        entry = msg.logprobs.add(token_id=lp.token_id, logprob=lp.logprob)
        for token_id, logprob in lp.top:
            entry.top.add(token_id=token_id, logprob=logprob)
    if delta.finish_reason is not None:
        msg.finish_reason = FINISH_TO_PROTO[delta.finish_reason]
        msg.usage.prompt_tokens = delta.prompt_tokens
        msg.usage.completion_tokens = delta.completion_tokens
        msg.usage.cached_tokens = delta.cached_tokens
    return msg
