"""The scheduler's worker registry: pure state over dataclasses, clock injected.

A worker is live from RegisterWorker until it deregisters or stays silent for
`timeout_s` (no heartbeat). `pick` chooses, among live workers serving the
model, the one with the fewest requests in flight (ties: least recently picked,
so equal workers take turns).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from wicore.errors import ModelNotFound, WorkerUnavailable


@dataclass(slots=True)
class WorkerLoad:
    running: int = 0
    waiting: int = 0
    free_blocks: int = 0


@dataclass(slots=True)
class WorkerInfo:
    worker_id: str
    address: str
    device: str
    model: str
    max_context: int
    total_blocks: int = 0
    block_size: int = 0
    max_batch_size: int = 0
    load: WorkerLoad = field(default_factory=WorkerLoad)
    last_seen: float = 0.0
    registered_at: float = 0.0
    inflight: int = 0  # requests this scheduler has placed and not seen finish
    last_picked: float = 0.0


class WorkerRegistry:
    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self.clock = clock
        self.workers: dict[str, WorkerInfo] = {}
        self.models_seen: set[str] = set()

    def register(self, info: WorkerInfo) -> None:
        now = self.clock()
        info.last_seen = now
        info.registered_at = now
        previous = self.workers.get(info.worker_id)
        if previous is not None:
            info.inflight = previous.inflight
        self.workers[info.worker_id] = info
        self.models_seen.add(info.model)

    def heartbeat(self, worker_id: str, load: WorkerLoad) -> bool:
        """False when the worker is unknown (it must register again)."""
        info = self.workers.get(worker_id)
        if info is None:
            return False
        info.load = load
        info.last_seen = self.clock()
        return True

    def remove(self, worker_id: str) -> WorkerInfo | None:
        return self.workers.pop(worker_id, None)

    def expire(self) -> list[WorkerInfo]:
        """Drops workers silent for longer than timeout_s; returns them."""
        cutoff = self.clock() - self.timeout_s
        dead = [w for w in self.workers.values() if w.last_seen < cutoff]
        for w in dead:
            del self.workers[w.worker_id]
        return dead

    def default_model(self) -> str:
        if not self.workers:
            return ""
        return min(self.workers.values(), key=lambda w: w.registered_at).model

    def serving(self, model: str) -> list[WorkerInfo]:
        return [w for w in self.workers.values() if w.model == model]

    def pick(self, model: str, exclude: frozenset[str] = frozenset()) -> WorkerInfo:
        """The live worker to run a request for `model` ("" = the default model)."""
        if not self.workers:
            raise WorkerUnavailable("no worker is registered with the scheduler; is a worker running?")
        model = model or self.default_model()
        candidates = [w for w in self.serving(model) if w.worker_id not in exclude]
        if not candidates:
            if model in self.models_seen:
                raise WorkerUnavailable(f"no live worker serves model {model!r} right now")
            served = sorted({w.model for w in self.workers.values()})
            raise ModelNotFound(f"model: {model!r} is not served here (served: {served})")
        chosen = min(candidates, key=lambda w: (w.inflight, w.load.running + w.load.waiting, w.last_picked))
        chosen.last_picked = self.clock()
        return chosen
