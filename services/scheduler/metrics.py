"""The scheduler's metrics: its queue, where it placed requests and why, its workers.

    wicore:scheduler_queue_depth{priority}           requests waiting now, by priority (low … urgent)
    wicore:scheduler_queue_time_seconds              queued → placed on a worker (histogram)
    wicore:scheduler_requests_running                placed and not finished (in flight, all workers)
    wicore:routing_decisions_total{policy, outcome}  placements, by what became of the prompt's prefix
    wicore:workers{device}                           live registered workers, cpu or gpu
    wicore:prefix_lookup_failures_total              requests routed without Redis' residency answer

The gauges and the lookup failures are read from the queue, the worker registry and the
prefix index at scrape time (the scrape runs on the event loop, between handlers); the
histogram and the routing counter are counted by the Generate handler at each placement
(a request that fails over to another worker is placed, and counted, again).

A routing outcome says whether the placement used the prefix blocks that were to be had
(`routing_outcome`): `device_prefix` (the chosen worker holds the most of them on its
device), `away_from_prefix` (another live worker held more: the router weighed load or
device kind above them), `tier_prefix` (no worker's device has them, the tier service
holds the leading ones) or `no_prefix` (nothing reusable anywhere).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from wicore.metrics import PREFIX, TTFT_BUCKETS, service_registry
from wicore.scheduler.prefix_index import PrefixIndex
from wicore.scheduler.registry import WorkerInfo, WorkerRegistry
from wicore.scheduler.request_queue import RequestQueue
from wicore.scheduler.state import PrefixInfo, Priority

DEVICE_KINDS = ("cpu", "gpu")


class RoutingOutcome(enum.StrEnum):
    DEVICE_PREFIX = "device_prefix"
    AWAY_FROM_PREFIX = "away_from_prefix"
    TIER_PREFIX = "tier_prefix"
    NO_PREFIX = "no_prefix"


def routing_outcome(
    prefix: PrefixInfo,
    chosen: WorkerInfo,
    cached_blocks: int,
    live: Iterable[WorkerInfo],
    resident: Mapping[str, int] | None = None,
) -> RoutingOutcome:
    """What the placement of a request with `prefix` on `chosen` did with its prefix blocks.

    `cached_blocks`: its prompt blocks resident on `chosen` (the batcher's count: Redis'
    answer or the scheduler's placement hints). Another worker's count is the larger of
    Redis' (`prefix.device`) and `resident` (what the batcher saw for every live worker of
    the model, busy ones included); only workers still `live` count, so one that died since
    cannot make a placement look like it went away from the prefix.
    """
    resident = resident or {}
    elsewhere = max(
        (
            max(prefix.device.get(w.worker_id, 0), resident.get(w.worker_id, 0))
            for w in live
            if w.worker_id != chosen.worker_id
        ),
        default=0,
    )
    if elsewhere > cached_blocks:
        return RoutingOutcome.AWAY_FROM_PREFIX
    if cached_blocks > 0:
        return RoutingOutcome.DEVICE_PREFIX
    tiers = prefix.tier(chosen.tier_node)
    if tiers and tiers[0] is not None:
        return RoutingOutcome.TIER_PREFIX
    return RoutingOutcome.NO_PREFIX


def device_kind(worker: WorkerInfo) -> str:
    """The `device` label: "gpu" for any GPU worker ("gpu:0", "gpu:1", …), else "cpu"."""
    return "gpu" if worker.is_gpu else "cpu"


class SchedulerCollector(Collector):
    """The gauges read from the scheduler's state at scrape time, and the lookup failures."""

    def __init__(self, queue: RequestQueue, workers: WorkerRegistry, prefixes: PrefixIndex) -> None:
        self.queue = queue
        self.workers = workers
        self.prefixes = prefixes

    def collect(self) -> Iterator[Metric]:
        depth = {p: 0 for p in Priority}
        for request in self.queue:
            depth[Priority(request.priority)] += 1
        doc = "Requests waiting for a worker, by priority."
        queue_depth = GaugeMetricFamily(f"{PREFIX}scheduler_queue_depth", doc, labels=["priority"])
        for priority, n in depth.items():
            queue_depth.add_metric([priority.name.lower()], n)
        yield queue_depth
        workers = list(self.workers.workers.values())
        by_kind = dict.fromkeys(DEVICE_KINDS, 0)
        for w in workers:
            by_kind[device_kind(w)] += 1
        doc = "Live registered workers, by device kind."
        live = GaugeMetricFamily(f"{PREFIX}workers", doc, labels=["device"])
        for kind, n in by_kind.items():
            live.add_metric([kind], n)
        yield live
        yield GaugeMetricFamily(
            f"{PREFIX}scheduler_requests_running",
            "Requests placed on a worker and not finished (in flight over all workers).",
            value=sum(w.inflight for w in workers),
        )
        yield CounterMetricFamily(
            f"{PREFIX}prefix_lookup_failures",
            "Requests routed without Redis' residency answer (it failed, timed out, or was not asked "
            "while resting after a failure): routing by load alone.",
            value=self.prefixes.failures,
        )


class SchedulerMetrics:
    """The scheduler's registry: the collector above, plus what the Generate handler counts."""

    def __init__(
        self,
        policy: str,
        queue: RequestQueue,
        workers: WorkerRegistry,
        prefixes: PrefixIndex,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry if registry is not None else service_registry()
        self.registry.register(SchedulerCollector(queue, workers, prefixes))
        self.policy = str(policy)
        self.queue_time = Histogram(
            f"{PREFIX}scheduler_queue_time_seconds", "Time a request waited in the queue until placed.",
            buckets=TTFT_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.routing = Counter(
            f"{PREFIX}routing_decisions", "Placements, by routing policy and what they did with the prefix.",
            ["policy", "outcome"], registry=self.registry,
        )  # fmt: skip
        # Every outcome present from the start (rate() works from the first one), children bound once.
        self._routed = {o: self.routing.labels(self.policy, o.value) for o in RoutingOutcome}

    def placed(self, waited_s: float, outcome: RoutingOutcome) -> None:
        """A request was placed after `waited_s` in the queue."""
        self.queue_time.observe(waited_s)
        self._routed[outcome].inc()
