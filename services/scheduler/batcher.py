"""BatchOptimizer: which queued requests go to which workers now.

    queue (priority + aging) ──▶ plan(now) ──▶ assignments: request → worker, blocks reserved
                                   │  per request, best first:
                                   │    live workers for its model, not excluded
                                   │    ─▶ with a free batch slot (inflight < batch_limit)
                                   │    ─▶ whose free KV fits it ─▶ router picks one
                                   └─▶ expired (deadline passed), orphaned (no live worker)

A request's KV need on worker w is ceil((prompt + max_new) / block_size) blocks
minus the prompt blocks already resident on w, capped at w's whole pool (a
request bigger than any pool goes to an idle worker, which refuses it with the
exact reason). It fits while need <= total_blocks - reserved_blocks, where
reserved_blocks sums the needs of the requests placed there and not finished:
a worst-case reservation, so a placed request never waits on the worker for
memory held by another placement.

The router may hold a request for a busy worker (no free slot, its KV fits) that holds
more of its prompt (MoR's `wait_budget`, at most `aging_interval_s`, and never past the
request's deadline): it stays queued until a slot frees there or the budget, counted from
the first time it was held, runs out; requests behind it go on being placed meanwhile, and
the plan wakes up when the budget ends.

Lower-priority requests may pass one that does not fit yet (backfill), unless
it has waited `aging_interval_s` or more: then nothing behind it is placed until
it fits, so large requests cannot starve. With `max_wait_time_s` > 0, fewer
queued requests than one batch are held until the oldest has waited that long
(the seed's BatchOptimizer); the default 0 places at once, since the workers
batch continuously and holding only adds latency. Length-sorted packing is not
done here: the worker packs sequences without padding, so there is none to save.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from wicore.config import SchedulerConfig
from wicore.scheduler.hints import PlacementHints
from wicore.scheduler.registry import WorkerInfo, WorkerRegistry
from wicore.scheduler.request_queue import RequestQueue
from wicore.scheduler.router import Router, batch_limit, max_new_tokens
from wicore.scheduler.state import QueuedRequest


@dataclass(frozen=True, slots=True)
class Assignment:
    request: QueuedRequest
    worker: WorkerInfo
    blocks: int  # reserved on the worker until the request ends
    resident: Mapping[str, int]  # prompt blocks on the device of each candidate weighed

    @property
    def cached_blocks(self) -> int:
        """Prompt blocks expected to be reused on the chosen worker."""
        return self.resident.get(self.worker.worker_id, 0)


@dataclass(slots=True)
class Plan:
    assignments: list[Assignment] = field(default_factory=list)
    expired: list[QueuedRequest] = field(default_factory=list)
    orphaned: list[QueuedRequest] = field(default_factory=list)
    wake_at: float | None = None  # plan again then, even if nothing else happens


def kv_need(request: QueuedRequest, worker: WorkerInfo, resident: int) -> int:
    """Blocks the request may take on `worker` beyond the `resident` prompt blocks it reuses."""
    if worker.total_blocks <= 0:
        return 0
    bs = worker.block_size or 1
    total = -(-(request.prompt_tokens + max_new_tokens(request, worker)) // bs)
    return min(worker.total_blocks, max(0, total - resident))


class BatchOptimizer:
    def __init__(
        self, config: SchedulerConfig, router: Router, hints: PlacementHints, orphan_timeout_s: float
    ) -> None:
        self.config = config
        self.router = router
        self.hints = hints
        self.orphan_timeout_s = orphan_timeout_s

    def resident(self, request: QueuedRequest, worker: WorkerInfo, now: float) -> int:
        """Prompt blocks on `worker`'s device: what Redis said, or what the scheduler sent it since."""
        prefix = request.prefix
        if not prefix.hashes or worker.fingerprint != prefix.fingerprint:
            return 0
        if worker.block_size != prefix.block_size:
            return 0
        known = prefix.device.get(worker.worker_id, 0)
        return max(known, self.hints.prefix_len(worker.worker_id, prefix.hashes, now))

    def _holding(self, queue: RequestQueue, registry: WorkerRegistry, now: float) -> float | None:
        """When a partial batch is being held: the time the hold ends."""
        wait = self.config.max_wait_time_s
        if wait <= 0 or not len(queue):
            return None
        limit = min((batch_limit(w, self.config) for w in registry.workers.values()), default=1)
        oldest = min(r.arrival for r in queue)
        if len(queue) < limit and now < oldest + wait:
            return oldest + wait
        return None

    def plan(self, now: float, queue: RequestQueue, registry: WorkerRegistry) -> Plan:
        plan = Plan(expired=queue.expire(now))
        hold_until = self._holding(queue, registry, now)
        if hold_until is not None:
            plan.wake_at = hold_until
        else:
            for request in queue.ordered(now):
                if not self._place(request, now, registry, plan):
                    break
            for a in plan.assignments:
                queue.remove(a.request.request_id)
        for r in plan.orphaned:
            queue.remove(r.request_id)
        wakes = [t for t in (plan.wake_at, queue.next_deadline()) if t is not None]
        wakes += [r.orphaned_since + self.orphan_timeout_s for r in queue if r.orphaned_since is not None]
        plan.wake_at = min(wakes, default=None)
        return plan

    @staticmethod
    def _hold(request: QueuedRequest, budget: float, now: float, plan: Plan) -> bool:
        """Keeps `request` queued while `budget` seconds from the first time it was held have not
        passed, and would still end before its deadline; the plan wakes when the budget ends."""
        held_since = now if request.held_since is None else request.held_since
        until = held_since + budget
        if now >= until or (request.deadline is not None and until >= request.deadline):
            return False
        request.held_since = held_since
        plan.wake_at = until if plan.wake_at is None else min(plan.wake_at, until)
        return True

    def _place(self, request: QueuedRequest, now: float, registry: WorkerRegistry, plan: Plan) -> bool:
        """Places `request` if it can go somewhere now; False: place nothing more this round."""
        live = [w for w in registry.serving(request.model) if w.worker_id not in request.exclude]
        if not live:
            request.orphaned_since = request.orphaned_since if request.orphaned_since is not None else now
            if now >= request.orphaned_since + self.orphan_timeout_s:
                plan.orphaned.append(request)
            return True
        request.orphaned_since = None
        open_slots = [w for w in live if w.inflight < batch_limit(w, self.config)]
        if not open_slots:
            return any(w.inflight < batch_limit(w, self.config) for w in registry.workers.values())
        resident = {w.worker_id: self.resident(request, w, now) for w in live}
        need = {w.worker_id: kv_need(request, w, resident[w.worker_id]) for w in live}
        fitting = [w for w in live if need[w.worker_id] <= w.total_blocks - w.reserved_blocks]
        candidates = [w for w in fitting if w.inflight < batch_limit(w, self.config)]
        if not candidates:
            starving = now - request.arrival >= self.config.aging_interval_s
            return not starving
        worker = self.router.choose(request, candidates, resident)
        busy = [w for w in fitting if w.inflight >= batch_limit(w, self.config)]
        budget = self.router.wait_budget(request, candidates, worker, busy, resident)
        if budget > 0.0 and self._hold(request, min(budget, self.config.aging_interval_s), now, plan):
            return True  # it waits for a busy worker; the requests behind it may pass
        request.held_since = None  # a later hold (after a failover, say) starts afresh
        registry.place(worker, need[worker.worker_id])
        self.hints.record(worker.worker_id, request.prefix.hashes, now)
        plan.assignments.append(Assignment(request, worker, need[worker.worker_id], resident))
        return True
