"""Scheduler process: the worker registry and request placement."""

from __future__ import annotations

import asyncio
import contextlib

from wicore.config import Config
from wicore.scheduler.registry import WorkerRegistry
from wicore.scheduler.servicer import SchedulerServicer
from wicore.server import ServiceServer
from wicore.v1 import scheduler_pb2_grpc


async def serve(config: Config) -> None:
    sc = config.scheduler
    server = ServiceServer("scheduler", sc.host, sc.port, config.shutdown_grace_s)
    servicer = SchedulerServicer(WorkerRegistry(sc.worker_timeout_s), sc.heartbeat_interval_s)
    server.add(scheduler_pb2_grpc.add_SchedulerServicer_to_server, servicer, "wicore.v1.Scheduler")
    await server.start()
    await server.set_serving(True)
    expiry = asyncio.create_task(servicer.expire_loop())
    try:
        await server.serve_until_signal()
    finally:
        expiry.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await expiry
        await servicer.channels.close_all()
