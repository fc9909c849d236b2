"""The glue between the pure policy and asyncio: requests wait here for a worker.

    Generate handler ── wait_for_worker(req) ──▶ queue.push ─┐
          ▲                                                  ▼
          └──── future: Assignment / error ◀── kick(): BatchOptimizer.plan(now)
                                                   ▲  on every event: arrival, finish,
                                                   │  registration, heartbeat, worker lost,
                                                   └─ and a timer at plan.wake_at (deadlines)

Each event re-plans synchronously on the event loop, so placements are made in
one place, in priority order, and counted in the registry at once. A request
whose handler goes away (client cancel, gRPC deadline) leaves the queue.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

from wicore.errors import DeadlineExceeded, WorkerUnavailable
from wicore.scheduler.batcher import Assignment, BatchOptimizer
from wicore.scheduler.registry import WorkerRegistry
from wicore.scheduler.request_queue import RequestQueue
from wicore.scheduler.state import QueuedRequest

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(self, registry: WorkerRegistry, queue: RequestQueue, batcher: BatchOptimizer) -> None:
        self.registry = registry
        self.queue = queue
        self.batcher = batcher
        self._waiting: dict[str, asyncio.Future[Assignment]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._seq = itertools.count()

    def next_seq(self) -> int:
        return next(self._seq)

    async def wait_for_worker(self, request: QueuedRequest, *, requeue: bool = False) -> Assignment:
        """Queues `request` and returns where it was placed (its blocks reserved there)."""
        rid = request.request_id
        if rid in self._waiting:
            raise ValueError(f"request {rid!r} is waiting already")
        self.queue.push(request, requeue=requeue)  # Overloaded when full
        future: asyncio.Future[Assignment] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = future
        try:
            self.kick()
            return await future
        except BaseException:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.finished(future.result())  # placed just as the caller went away
            raise
        finally:
            self._waiting.pop(rid, None)
            self.queue.remove(rid)

    def finished(self, assignment: Assignment) -> None:
        """A placed request ended (however): its slot and blocks are free again."""
        worker = assignment.worker
        self.registry.release(worker.worker_id, worker.epoch, assignment.blocks)
        self.kick()

    def kick(self) -> None:
        """Plans now: hands out placements, fails expired and orphaned requests."""
        now = self.registry.clock()
        plan = self.batcher.plan(now, self.queue, self.registry)
        for a in plan.assignments:
            self._resolve(a.request, a)
        for r in plan.expired:
            message = f"request {r.request_id} waited in the scheduler's queue past its deadline"
            self._resolve(r, DeadlineExceeded(message))
        for r in plan.orphaned:
            self._resolve(
                r, WorkerUnavailable(f"no live worker serves model {r.model!r} for request {r.request_id}")
            )
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if plan.wake_at is not None:
            delay = max(0.0, plan.wake_at - now) + 0.001
            self._timer = asyncio.get_running_loop().call_later(delay, self.kick)

    def _resolve(self, request: QueuedRequest, outcome: Assignment | Exception) -> None:
        future = self._waiting.get(request.request_id)
        if future is None or future.done():
            if isinstance(outcome, Assignment):  # nobody waits for it any more: undo, plan again
                self.registry.release(outcome.worker.worker_id, outcome.worker.epoch, outcome.blocks)
                asyncio.get_running_loop().call_soon(self.kick)
            return
        if isinstance(outcome, Assignment):
            future.set_result(outcome)
        else:
            log.info("%s", outcome)
            future.set_exception(outcome)
