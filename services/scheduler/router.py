"""Routing policies: which of the workers that can take a request now gets it.

The batcher hands a policy only candidates with a free batch slot and room for
the request's KV; the policy picks one. Three policies, by name
(`scheduler.routing_policy`): `mor`, `round_robin`, `least_loaded`.

MoR ("Mixture of Routers", from the performance guide) prices every candidate w and takes
the cheapest:

    cost(w) = device(w) + prefix_weight · prefill(w) + queue_weight · queue(w)

    prefill(w) = min(1, uncomputed(w) / prefill_scale_tokens)
        uncomputed(w) = n - bs·(d_w + t_w) + bs·Σ price(tier of block i), i in [d_w, d_w + t_w)
        n = prompt tokens, d_w = prompt blocks resident on w's device (Redis
        `{ns}:res:{w}` plus the scheduler's placement hints), t_w = blocks after
        those that w's own tier service holds (`{ns}:tier:{node}:blk:{hash}` field
        `tier`, node = the tier w registered with), each priced as a fraction of
        recomputing it: price(tier) = min(1, load_s(tier) · prefill_tok_s / bs), both
        measured by w and sent with its heartbeats (worker/costs.py); tier_cpu_cost,
        tier_nvme_cost until w has measured them. A block held only by another node's
        tier is a miss for w: w cannot load it.
    queue(w)   = inflight(w) / batch_limit(w)              (occupancy of its batch)
    util(w)    = max(queue(w), kv_utilisation(w))
    a          = clamp(min(1, (n + max_new) / attention_scale_tokens) + 0.5 - θ, 0, 1)
        θ = the workload type's threshold: creative_writing 0.3, code_generation
        0.5, simple_qa 0.7, default 0.5 (a lower θ raises a: more goes to GPUs).
    device(w)  = 0.5·a + 0.3·util(w)        on a CPU worker   (the seed's cpu_cost)
               = 0.5·(1 - a) + 0.3·util(w)  on a GPU worker   (the seed's gpu_cost)

When the worker MoR would pick is busy (no free batch slot), the request may wait
for it in the scheduler's queue, at most as long as the prefill it would save there
(`wait_budget`), while requests behind it go on being placed.

Ties go to the worker picked least recently, then the smaller id. Death-spiral
guard: a worker already holding more than `max_imbalance` requests above the
least loaded candidate is not considered, however much of the prefix it holds,
so a hot prefix (or a run of misses tied on cost) cannot pile onto one worker;
and `inflight` counts placements at once, not at the next heartbeat.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from wicore.config import RoutingPolicy, SchedulerConfig
from wicore.kv.block import StorageTier
from wicore.scheduler.registry import WorkerInfo
from wicore.scheduler.state import WORKLOAD_THRESHOLDS, QueuedRequest


def batch_limit(worker: WorkerInfo, config: SchedulerConfig) -> int:
    """Requests in flight a worker may have: the scheduler's limit, else the worker's own."""
    return max(1, config.max_batch_size or worker.max_batch_size or 1)


def max_new_tokens(request: QueuedRequest, worker: WorkerInfo) -> int:
    """What the worker will allow the request to generate (its default when unset)."""
    if request.max_new_tokens is not None:
        return request.max_new_tokens
    room = worker.max_context - request.prompt_tokens if worker.max_context else worker.default_max_tokens
    return max(1, min(worker.default_max_tokens, room))


@dataclass(frozen=True, slots=True)
class Cost:
    """One candidate's MoR cost, term by term (for tests, logs and the benchmark)."""

    worker_id: str
    device: float
    prefill: float
    queue: float
    total: float


class Router(Protocol):
    name: str

    def choose(
        self, request: QueuedRequest, candidates: Sequence[WorkerInfo], resident: Mapping[str, int]
    ) -> WorkerInfo:
        """One of `candidates` (never empty); `resident[w]` = prompt blocks on w's device."""
        ...

    def wait_budget(
        self,
        request: QueuedRequest,
        candidates: Sequence[WorkerInfo],
        chosen: WorkerInfo,
        busy: Sequence[WorkerInfo],
        resident: Mapping[str, int],
    ) -> float:
        """Seconds the request may stay queued for one of `busy` (no free batch slot now, its KV
        would fit) rather than go now to `chosen`, picked among `candidates`; 0: go now."""
        ...


class MoRRouter:
    name = "mor"

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config

    def attention_score(self, request: QueuedRequest, worker: WorkerInfo) -> float:
        size = request.prompt_tokens + max_new_tokens(request, worker)
        heaviness = min(1.0, size / max(1, self.config.attention_scale_tokens))
        return min(1.0, max(0.0, heaviness + 0.5 - WORKLOAD_THRESHOLDS[request.workload]))

    def uncomputed_tokens(self, request: QueuedRequest, worker: WorkerInfo, resident: int) -> float:
        prefix = request.prefix
        bs = prefix.block_size or worker.block_size or 1
        loaded, price = 0, 0.0
        for tier in prefix.tier(worker.tier_node)[resident:]:
            if tier is None:
                break
            loaded += 1
            price += self.tier_price(worker, tier, bs)
        return max(0.0, request.prompt_tokens - bs * (resident + loaded) + bs * price)

    def tier_price(self, worker: WorkerInfo, tier: StorageTier, block_size: int) -> float:
        """Loading one block from `tier` as a fraction of recomputing it, on `worker`: what the
        worker measured, load seconds per block * prefill tokens per second / block_size, at most
        1 (past that the worker recomputes instead); the configured price until it has measured."""
        rate = worker.load.prefill_tokens_per_s
        seconds = worker.load.load_s_per_block.get(tier.value, 0.0)
        if rate > 0.0 and seconds > 0.0:
            return min(1.0, seconds * rate / block_size)
        return self.config.tier_cpu_cost if tier is StorageTier.CPU else self.config.tier_nvme_cost

    def cost(self, request: QueuedRequest, worker: WorkerInfo, resident: int) -> Cost:
        c = self.config
        uncomputed = self.uncomputed_tokens(request, worker, resident)
        prefill = min(1.0, uncomputed / max(1, c.prefill_scale_tokens))
        queue = min(1.0, worker.inflight / batch_limit(worker, c))
        util = max(queue, worker.kv_utilisation)
        a = self.attention_score(request, worker)
        device = 0.5 * (1.0 - a if worker.is_gpu else a) + 0.3 * util
        total = device + c.prefix_weight * prefill + c.queue_weight * queue
        return Cost(worker.worker_id, device, prefill, queue, total)

    def choose(
        self, request: QueuedRequest, candidates: Sequence[WorkerInfo], resident: Mapping[str, int]
    ) -> WorkerInfo:
        least = min(w.inflight for w in candidates)
        eligible = [w for w in candidates if w.inflight <= least + self.config.max_imbalance]
        costs = {w.worker_id: self.cost(request, w, resident.get(w.worker_id, 0)).total for w in eligible}
        return min(eligible, key=lambda w: (round(costs[w.worker_id], 9), w.last_picked, w.worker_id))

    def prefill_seconds(self, request: QueuedRequest, worker: WorkerInfo, resident: int) -> float:
        """The prompt's prefill on `worker`: uncomputed tokens over its measured prefill speed
        (`assumed_prefill_tokens_per_s` until it has measured)."""
        rate = worker.load.prefill_tokens_per_s or self.config.assumed_prefill_tokens_per_s
        return self.uncomputed_tokens(request, worker, resident) / rate

    def wait_budget(
        self,
        request: QueuedRequest,
        candidates: Sequence[WorkerInfo],
        chosen: WorkerInfo,
        busy: Sequence[WorkerInfo],
        resident: Mapping[str, int],
    ) -> float:
        """How long to wait for a busy worker rather than go to `chosen` (the pick among the
        `candidates` with a free slot) now: the prefill time that worker would save (ski rental),

            budget = f · max over holders h of (prefill_s(chosen) - prefill_s(h))

        where a holder is a busy worker that `choose` would take over every candidate if one of
        its slots were free (MoR's own costs decide, max_imbalance included), f =
        `prefix_wait_factor` (1; 0 turns waiting off), prefill_s(w) = uncomputed(w) / w's
        measured prefill tokens per second; 0 when it saves less than one block's prefill on
        `chosen`. Under load, when every slot is taken, this keeps a prefix with the workers that
        hold it instead of sending it to whichever slot frees first, where it is computed again
        (which takes longer still and feeds the queue). The bound is on the wait chosen, not on the
        whole queueing: the free slot may be taken meanwhile by a request that passes this one."""
        if self.config.prefix_wait_factor <= 0.0 or not busy:
            return 0.0
        mine = self.prefill_seconds(request, chosen, resident.get(chosen.worker_id, 0))
        saved = 0.0
        for holder in busy:
            freed = dataclasses.replace(holder, inflight=holder.inflight - 1)
            if self.choose(request, [*candidates, freed], resident) is freed:
                saved = max(
                    saved, mine - self.prefill_seconds(request, holder, resident.get(holder.worker_id, 0))
                )
        rate = chosen.load.prefill_tokens_per_s or self.config.assumed_prefill_tokens_per_s
        bs = request.prefix.block_size or chosen.block_size or 1
        return self.config.prefix_wait_factor * saved if saved >= bs / rate else 0.0


class NeverWaits:
    """For the load-only policies: a request never waits for a particular worker."""

    def wait_budget(
        self,
        request: QueuedRequest,
        candidates: Sequence[WorkerInfo],
        chosen: WorkerInfo,
        busy: Sequence[WorkerInfo],
        resident: Mapping[str, int],
    ) -> float:
        return 0.0


class RoundRobinRouter(NeverWaits):
    """Takes workers in turn (by id), skipping those that cannot take the request now."""

    name = "round_robin"

    def __init__(self, config: SchedulerConfig) -> None:
        self._last = ""

    def choose(
        self, request: QueuedRequest, candidates: Sequence[WorkerInfo], resident: Mapping[str, int]
    ) -> WorkerInfo:
        ordered = sorted(candidates, key=lambda w: w.worker_id)
        chosen = next((w for w in ordered if w.worker_id > self._last), ordered[0])
        self._last = chosen.worker_id
        return chosen


class LeastLoadedRouter(NeverWaits):
    """The lowest batch occupancy; ties: least recently picked, then the smaller id."""

    name = "least_loaded"

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config

    def choose(
        self, request: QueuedRequest, candidates: Sequence[WorkerInfo], resident: Mapping[str, int]
    ) -> WorkerInfo:
        return min(
            candidates,
            key=lambda w: (w.inflight / batch_limit(w, self.config), w.last_picked, w.worker_id),
        )


ROUTERS: Mapping[RoutingPolicy, type[MoRRouter] | type[RoundRobinRouter] | type[LeastLoadedRouter]] = {
    RoutingPolicy.MOR: MoRRouter,
    RoutingPolicy.ROUND_ROBIN: RoundRobinRouter,
    RoutingPolicy.LEAST_LOADED: LeastLoadedRouter,
}


def make_router(config: SchedulerConfig) -> Router:
    """The router `config.routing_policy` names (checked when the config was loaded)."""
    return ROUTERS[RoutingPolicy(config.routing_policy)](config)
