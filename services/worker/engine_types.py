"""The engine's contract: plain dataclasses, no protobuf, no sockets."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from wicore.kv.hashing import BlockHash


class FinishReason(enum.Enum):
    STOP = "stop"  # end-of-sequence, a stop token id or a stop string
    LENGTH = "length"  # max_new_tokens reached
    ABORT = "abort"  # cancelled by the caller or the service


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    min_p: float = 0.0  # 0 = disabled
    repetition_penalty: float = 1.0  # 1 = disabled
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be finite and > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(slots=True)
class EngineRequest:
    """One request as the engine sees it: token ids in, token ids out."""

    request_id: str
    prompt_token_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: frozenset[int] = frozenset()
    logprobs: int | None = None  # None: no logprobs; n: the sampled token's and the top n
    cache_salt: str = ""  # requests share cached prefixes only under the same salt
    # Hashes of the prompt's first full blocks when the caller has them (the scheduler
    # does); the engine hashes only the blocks after them, once.
    block_hashes: list[BlockHash] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(slots=True)
class RequestTimes:
    """A request's way through the engine, written by the engine thread (`time.time()`; 0.0: not
    yet), read by the worker once the request finished (metrics and trace spans)."""

    arrived: float = 0.0  # added to the engine
    scheduled: float = 0.0  # first in a step (admitted): the end of its queue time
    first_token: float = 0.0  # its first output token sampled: the end of prefill
    finished: float = 0.0  # its last token sampled
    preemptions: int = 0


@dataclass(slots=True)
class StepOutput:
    """What one engine step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    cached_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    times: RequestTimes | None = None  # the request's own (one object for all its steps)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: int
    waiting: int
    free_blocks: int
    total_blocks: int
    block_size: int
    # Since start: prompt tokens of first admissions, and those of them found in the prefix cache.
    prefix_queries: int = 0
    prefix_hits: int = 0
    preemptions: int = 0
    # Speculative decoding since start: steps that verified proposals, tokens proposed, tokens
    # accepted (those steps emitted spec_accepted + spec_drafts tokens).
    spec_drafts: int = 0
    spec_proposed: int = 0
    spec_accepted: int = 0
