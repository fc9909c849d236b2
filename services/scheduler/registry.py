"""The scheduler's worker registry: pure state over dataclasses, clock injected.

A worker is live from RegisterWorker until it deregisters, stays silent for
`timeout_s` (no heartbeat) or a call to it breaks (`remove`). Each worker's
`inflight` and `reserved_blocks` count the requests this scheduler placed on it
and the KV blocks they may take (`place` / `release`); they are exact at every
moment, unlike the heartbeat's `load`, which lags by up to one interval.
Request placement is the batcher's and the router's job.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from wicore.errors import ModelNotFound, WorkerUnavailable


@dataclass(slots=True)
class WorkerLoad:
    running: int = 0
    waiting: int = 0
    free_blocks: int = 0
    loaded_blocks: Mapping[str, int] = field(default_factory=dict)  # KV offload: by source tier
    spilled_blocks: int = 0
    spill_failed_blocks: int = 0
    spec_drafts: int = 0  # speculative decoding: steps that verified proposals
    spec_proposed_tokens: int = 0
    spec_accepted_tokens: int = 0
    prefill_tokens_per_s: float = 0.0  # measured by the worker (0: not yet)
    load_s_per_block: Mapping[str, float] = field(default_factory=dict)  # measured, by tier ("cpu", "nvme")


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
    fingerprint: str = ""  # root of its block hashes
    default_max_tokens: int = 256
    tier_address: str = ""  # the tier service it spills to and loads from ("": none)
    tier_node: str = ""  # that tier's name: only its blocks are loadable for this worker ("": unknown)
    load: WorkerLoad = field(default_factory=WorkerLoad)
    last_seen: float = 0.0
    registered_at: float = 0.0
    inflight: int = 0  # requests this scheduler has placed and not seen finish
    reserved_blocks: int = 0  # KV blocks those requests may take (estimated at placement)
    dispatched: int = 0  # requests placed on it since it registered
    last_picked: float = 0.0
    epoch: int = 0  # which registration this is: a dropped worker that comes back gets a new one

    @property
    def is_gpu(self) -> bool:
        return self.device.startswith("gpu")

    @property
    def kv_utilisation(self) -> float:
        """The larger of what the scheduler reserved and what the worker last reported in use."""
        if self.total_blocks <= 0:
            return 0.0
        reported = 1.0 - min(self.load.free_blocks, self.total_blocks) / self.total_blocks
        return min(1.0, max(self.reserved_blocks / self.total_blocks, reported))


class WorkerRegistry:
    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self.clock = clock
        self.workers: dict[str, WorkerInfo] = {}
        self.models_seen: set[str] = set()
        self._epochs = 0

    def register(self, info: WorkerInfo) -> None:
        now = self.clock()
        info.last_seen = now
        info.registered_at = now
        previous = self.workers.get(info.worker_id)
        if previous is not None:  # registered again while its requests still run
            info.inflight = previous.inflight
            info.reserved_blocks = previous.reserved_blocks
            info.dispatched = previous.dispatched
            info.epoch = previous.epoch
        else:
            self._epochs += 1
            info.epoch = self._epochs
        self.workers[info.worker_id] = info
        self.models_seen.add(info.model)

    def heartbeat(self, worker_id: str, load: WorkerLoad, tier_node: str | None = None) -> bool:
        """False when the worker is unknown (it must register again)."""
        info = self.workers.get(worker_id)
        if info is None:
            return False
        info.load = load
        if tier_node is not None:
            info.tier_node = tier_node
        info.last_seen = self.clock()
        return True

    def tier_address(self, node: str) -> str:
        """Where the tier named `node` answers, as its workers reach it ("" if none says)."""
        return next(
            (w.tier_address for w in self.workers.values() if w.tier_node == node and w.tier_address), ""
        )

    def remove(self, worker_id: str) -> WorkerInfo | None:
        return self.workers.pop(worker_id, None)

    def place(self, worker: WorkerInfo, blocks: int) -> None:
        """Counts a request placed on `worker` that may take `blocks` KV blocks."""
        worker.inflight += 1
        worker.reserved_blocks += blocks
        worker.dispatched += 1
        worker.last_picked = self.clock()

    def release(self, worker_id: str, epoch: int, blocks: int) -> None:
        """A placed request ended; a no-op if that registration of the worker was dropped."""
        worker = self.workers.get(worker_id)
        if worker is not None and worker.epoch == epoch:
            worker.inflight = max(0, worker.inflight - 1)
            worker.reserved_blocks = max(0, worker.reserved_blocks - blocks)

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

    def resolve(self, model: str, exclude: frozenset[str] = frozenset()) -> list[WorkerInfo]:
        """The live workers serving `model` ("" = the default model), or the error saying why none."""
        if not self.workers:
            raise WorkerUnavailable("no worker is registered with the scheduler; is a worker running?")
        model = model or self.default_model()
        candidates = [w for w in self.serving(model) if w.worker_id not in exclude]
        if not candidates:
            if model in self.models_seen:
                raise WorkerUnavailable(f"no live worker serves model {model!r} right now")
            served = sorted({w.model for w in self.workers.values()})
            raise ModelNotFound(f"model: {model!r} is not served here (served: {served})")
        return candidates
