"""Scheduler process: the worker registry, the request queue and placement."""

from __future__ import annotations

import asyncio
import contextlib

from wicore.channels import InternalAuth, internal_server
from wicore.config import Config
from wicore.metrics import start_metrics
from wicore.scheduler.batcher import BatchOptimizer
from wicore.scheduler.dispatcher import Dispatcher
from wicore.scheduler.hints import PlacementHints
from wicore.scheduler.metrics import SchedulerMetrics
from wicore.scheduler.prefix_index import PrefixIndex
from wicore.scheduler.registry import WorkerRegistry
from wicore.scheduler.request_queue import RequestQueue
from wicore.scheduler.router import make_router
from wicore.scheduler.servicer import SchedulerServicer
from wicore.v1 import scheduler_pb2_grpc

# Placement hints live until the worker's own residency report has surely landed in Redis.
HINT_HEARTBEATS = 3


def build_servicer(config: Config) -> SchedulerServicer:
    """Every part of the scheduler, wired from the config (ConfigError names a bad setting)."""
    sc = config.scheduler
    registry = WorkerRegistry(sc.worker_timeout_s)
    hints = PlacementHints(ttl_s=HINT_HEARTBEATS * sc.heartbeat_interval_s)
    batcher = BatchOptimizer(sc, make_router(sc), hints, orphan_timeout_s=sc.worker_timeout_s)
    queue = RequestQueue(sc.max_queue_size, sc.aging_interval_s, registry.clock)
    prefixes = PrefixIndex(config.redis, sc.redis_timeout_s)
    auth = InternalAuth.load(config.internal)
    metrics = SchedulerMetrics(sc.routing_policy, queue, registry, prefixes)
    dispatcher = Dispatcher(registry, queue, batcher)
    return SchedulerServicer(sc, registry, dispatcher, prefixes, hints, sc.prefetch, auth, metrics)


async def serve(config: Config) -> None:
    sc = config.scheduler
    servicer = build_servicer(config)
    server = internal_server("scheduler", sc.host, sc.port, config)
    server.add(scheduler_pb2_grpc.add_SchedulerServicer_to_server, servicer, "wicore.v1.Scheduler")
    endpoint = await start_metrics("scheduler", config.observability, servicer.metrics.registry)
    expiry: asyncio.Task[None] | None = None
    try:
        await server.start()
        await server.set_serving(True)
        expiry = asyncio.create_task(servicer.expire_loop())

        async def drain() -> None:
            # A stopping scheduler drops no worker for missed heartbeats: its calls in flight
            # drain where they are. (Under `wicore up` the workers stop at the same moment, their
            # deregistration is refused, and failing their streams over would find no worker.)
            expiry.cancel()

        await server.serve_until_signal(drain)
    finally:
        if expiry is not None:
            expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await expiry
        await servicer.close()
        await servicer.prefixes.close()
        if endpoint is not None:
            await endpoint.stop()
