"""The scheduler's gRPC surface: worker registry RPCs, and requests placed on a
live worker whose stream is relayed back. A request whose worker fails before
producing any token is placed on another worker (at most `MAX_ATTEMPTS` times);
one that had produced tokens fails with UNAVAILABLE."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import grpc

from wicore.errors import WorkerUnavailable
from wicore.scheduler.registry import WorkerInfo, WorkerLoad, WorkerRegistry
from wicore.server import CHANNEL_OPTIONS
from wicore.v1 import inference_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2_grpc

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3


class Channels:
    """One gRPC channel per worker address, reused when a worker comes back."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def stub(self, address: str) -> worker_pb2_grpc.WorkerStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        return worker_pb2_grpc.WorkerStub(channel)

    async def close_all(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()


def _load(msg: scheduler_pb2.WorkerLoad) -> WorkerLoad:
    return WorkerLoad(running=msg.running, waiting=msg.waiting, free_blocks=msg.free_blocks)


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, registry: WorkerRegistry, heartbeat_interval_s: float) -> None:
        self.registry = registry
        self.heartbeat_interval_s = heartbeat_interval_s
        self.channels = Channels()

    async def RegisterWorker(
        self, request: scheduler_pb2.RegisterWorkerRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.RegisterWorkerResponse:
        self.registry.register(
            WorkerInfo(
                worker_id=request.worker_id,
                address=request.address,
                device=request.device,
                model=request.model,
                max_context=request.max_context,
                total_blocks=request.total_blocks,
                block_size=request.block_size,
                max_batch_size=request.max_batch_size,
                load=_load(request.load),
            )
        )
        log.info("worker %s registered (%s, model %s)", request.worker_id, request.device, request.model)
        return scheduler_pb2.RegisterWorkerResponse(heartbeat_interval_s=self.heartbeat_interval_s)

    async def Heartbeat(
        self, request: scheduler_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.HeartbeatResponse:
        return scheduler_pb2.HeartbeatResponse(
            known=self.registry.heartbeat(request.worker_id, _load(request.load))
        )

    async def DeregisterWorker(
        self, request: scheduler_pb2.DeregisterWorkerRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.DeregisterWorkerResponse:
        info = self.registry.remove(request.worker_id)
        if info is not None:
            log.info("worker %s deregistered", info.worker_id)
        return scheduler_pb2.DeregisterWorkerResponse()

    async def ListWorkers(
        self, request: scheduler_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListWorkersResponse:
        now = self.registry.clock()
        reply = scheduler_pb2.ListWorkersResponse()
        for w in self.registry.workers.values():
            reply.workers.add(
                worker_id=w.worker_id,
                address=w.address,
                device=w.device,
                model=w.model,
                load=scheduler_pb2.WorkerLoad(
                    running=w.load.running, waiting=w.load.waiting, free_blocks=w.load.free_blocks
                ),
                inflight=w.inflight,
                seconds_since_heartbeat=now - w.last_seen,
            )
        return reply

    async def expire_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            for info in self.registry.expire():
                # Its channel stays open: calls in flight on it end by themselves
                # (a dead peer resets the connection), and closing it would cancel
                # streams of a worker that is only slow or draining.
                log.warning("worker %s missed its heartbeats; dropped", info.worker_id)

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        reply = inference_pb2.ListModelsResponse(default_model=self.registry.default_model())
        for model in sorted({w.model for w in self.registry.workers.values()}):
            workers = self.registry.serving(model)
            reply.models.add(id=model, max_context=min(w.max_context for w in workers), workers=len(workers))
        return reply

    async def Tokenize(
        self, request: inference_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.TokenizeResponse:
        worker = self.registry.pick(request.model)
        request.model = worker.model
        stub = self.channels.stub(worker.address)
        reply: inference_pb2.TokenizeResponse = await stub.Tokenize(request, timeout=context.time_remaining())
        return reply

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        request.request_id = request.request_id or uuid.uuid4().hex
        failed: set[str] = set()
        for attempt in range(1, MAX_ATTEMPTS + 1):
            worker = self.registry.pick(request.model, frozenset(failed))
            request.model = worker.model
            produced = False
            call = self.channels.stub(worker.address).Generate(request, timeout=context.time_remaining())
            worker.inflight += 1
            try:
                async for msg in call:
                    produced = True
                    yield msg
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                log.warning(
                    "worker %s failed request %s: %s", worker.worker_id, request.request_id, exc.details()
                )
                if produced:
                    raise WorkerUnavailable(
                        f"worker {worker.worker_id} failed while streaming request {request.request_id}: "
                        f"{exc.details()}"
                    ) from None
                failed.add(worker.worker_id)
                if attempt == MAX_ATTEMPTS:
                    raise WorkerUnavailable(
                        f"request {request.request_id} failed on {attempt} workers; last: {exc.details()}"
                    ) from None
            finally:
                worker.inflight -= 1
                call.cancel()
