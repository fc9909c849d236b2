"""The engine interface and the foundation engine.

    add_request() ─▶ waiting ─▶ running ─▶ step() ─▶ StepOutput per request
                        ▲           │
                        └─ abort_request() removes from either, at once

`Engine` is the seam the worker's async loop drives; it is called from one
thread only. `SequentialEngine` keeps one transformers cache per sequence and,
at each step, advances every running sequence by one forward pass (prefill
for new ones, one decode token for the rest). Requests join and leave at step
boundaries, so many requests progress together and each gets exactly the
tokens it would get alone. The paged, batched engine replaces it behind the
same interface.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from wicore.worker.engine_types import EngineRequest, EngineStats, FinishReason, StepOutput
from wicore.worker.sampler import make_generator, sample


class Engine(Protocol):
    def add_request(self, request: EngineRequest) -> None: ...

    def abort_request(self, request_id: str) -> None: ...

    def step(self) -> list[StepOutput]: ...

    def has_unfinished(self) -> bool: ...

    def stats(self) -> EngineStats: ...


@dataclass(slots=True)
class _Sequence:
    request: EngineRequest
    generator: torch.Generator
    output_ids: list[int] = field(default_factory=list)
    cache: Any = None  # the transformers cache, created by the first forward

    @property
    def request_id(self) -> str:
        return self.request.request_id


class SequentialEngine:
    """Runs up to `max_running` sequences, one forward per sequence per step."""

    def __init__(self, model: torch.nn.Module, max_running: int) -> None:
        if max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {max_running}")
        self.model = model
        self.device = next(model.parameters()).device
        self.max_running = max_running
        self.waiting: collections.deque[_Sequence] = collections.deque()
        self.running: dict[str, _Sequence] = {}

    def add_request(self, request: EngineRequest) -> None:
        if request.request_id in self.running or any(
            s.request_id == request.request_id for s in self.waiting
        ):
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self.waiting.append(_Sequence(request, make_generator(request.sampling.seed)))

    def abort_request(self, request_id: str) -> None:
        if self.running.pop(request_id, None) is None:
            self.waiting = collections.deque(s for s in self.waiting if s.request_id != request_id)

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    def stats(self) -> EngineStats:
        free = self.max_running - len(self.running)
        return EngineStats(len(self.running), len(self.waiting), free, self.max_running, block_size=0)

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting.popleft()
            self.running[seq.request_id] = seq
        outputs = [self._advance(seq) for seq in list(self.running.values())]
        for out in outputs:
            if out.finished:
                del self.running[out.request_id]
        return outputs

    def _advance(self, seq: _Sequence) -> StepOutput:
        tokens = seq.request.prompt_token_ids if seq.cache is None else seq.output_ids[-1:]
        input_ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        out = self.model(input_ids=input_ids, cache=seq.cache, use_cache=True, logits_to_keep=1)
        seq.cache = out.cache
        token = sample(out.logits[0, -1], seq.request.sampling, seq.generator)
        seq.output_ids.append(token)
        return StepOutput(seq.request_id, [token], self._finish_reason(seq, token))

    def _finish_reason(self, seq: _Sequence, token: int) -> FinishReason | None:
        if token in seq.request.stop_token_ids:
            return FinishReason.STOP
        if len(seq.output_ids) >= seq.request.max_new_tokens:
            return FinishReason.LENGTH
        return None
