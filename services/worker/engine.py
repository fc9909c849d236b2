"""The interface between the worker's async loop and an engine.

    add_request() ─▶ waiting ─▶ running ─▶ step() ─▶ StepOutput per request
                        ▲           │
                        └─ abort_request() removes from either, at once

An engine is driven by one thread only. `PagedEngine` (paged_engine.py) is
the implementation.
"""

from __future__ import annotations

from typing import Protocol

from wicore.worker.engine_types import EngineRequest, EngineStats, StepOutput


class Engine(Protocol):
    def add_request(self, request: EngineRequest) -> None: ...

    def abort_request(self, request_id: str) -> None: ...

    def step(self) -> list[StepOutput]: ...

    def has_unfinished(self) -> bool: ...

    def stats(self) -> EngineStats: ...
