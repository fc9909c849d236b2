"""The interface between the worker's async loop and an engine.

    add_request() ─▶ waiting ─▶ running ─▶ step() ─▶ StepOutput per request
                        ▲           │
                        └─ abort_request() removes from either, at once

An engine is driven by one thread only. `PagedEngine` (paged_engine.py) is
the implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from wicore.kv.attention import Observation
from wicore.kv.hashing import BlockHash
from wicore.worker.costs import CostMeter
from wicore.worker.engine_types import EngineRequest, EngineStats, StepOutput
from wicore.worker.kv_io import Spilled


class Engine(Protocol):
    costs: CostMeter  # measured prefill speed (and tier load times, with offload)

    def add_request(self, request: EngineRequest) -> None: ...

    def abort_request(self, request_id: str) -> None: ...

    def step(self) -> list[StepOutput]: ...

    def has_unfinished(self) -> bool: ...

    def stats(self) -> EngineStats: ...

    def resident_hashes(self) -> frozenset[BlockHash]:
        """The prefix-cache block hashes on the device now (for routing)."""
        ...

    def device_prefix(self, chain: list[BlockHash]) -> int:
        """How many leading blocks of `chain` the device holds now; callable from any thread
        (a hint: the engine thread may reclaim them right after)."""
        ...

    def prefix_chain(self, request: EngineRequest) -> list[BlockHash]:
        """The block hashes an admission of `request` could reuse, kept in
        `request.block_hashes` (call before the request is added)."""
        ...

    def enable_offload(
        self,
        spill: Callable[[list[Spilled]], None],
        observe: Callable[[list[Observation]], None] | None = None,
    ) -> None: ...

    def install_blocks(self, chain: list[BlockHash], start: int, kv: list[torch.Tensor]) -> int: ...
