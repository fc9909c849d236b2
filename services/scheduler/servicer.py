"""The scheduler's gRPC surface: worker registry RPCs, and requests queued,
placed on a worker and relayed back.

Worker failure: a call to a worker that breaks (UNAVAILABLE: the process died,
the connection reset) or a worker dropped for missed heartbeats (its calls are
cancelled) removes that worker from the registry at once. The request goes back
to the queue, keeping its place, and is placed on another worker (at most
`MAX_ATTEMPTS` workers in all). One that had streamed tokens continues there
(Worker.Resume): the tokens the client already has are appended to its prompt,
so the stream goes on where it stopped (greedy output is the same as if nothing
had failed; a seeded sample continues with a fresh generator). After
`MAX_ATTEMPTS` workers it fails with UNAVAILABLE naming the last one.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from wicore.config import SchedulerConfig
from wicore.errors import WorkerUnavailable
from wicore.hashing import BlockHash
from wicore.scheduler import convert
from wicore.scheduler.batcher import Assignment
from wicore.scheduler.dispatcher import Dispatcher
from wicore.scheduler.hints import PlacementHints
from wicore.scheduler.prefix_index import PrefixIndex
from wicore.scheduler.registry import WorkerInfo, WorkerRegistry
from wicore.scheduler.router import batch_limit
from wicore.scheduler.state import QueuedRequest
from wicore.server import CHANNEL_OPTIONS
from wicore.tier_client import TierClient
from wicore.v1 import inference_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc

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


@dataclass(eq=False, slots=True)
class _Call:
    """A call in flight to a worker; `lost` when the registry dropped that worker."""

    call: grpc.aio.UnaryStreamCall
    lost: bool = False


@dataclass(slots=True)
class _Calls:
    by_worker: dict[str, set[_Call]] = field(default_factory=dict)

    def add(self, worker_id: str, call: _Call) -> None:
        self.by_worker.setdefault(worker_id, set()).add(call)

    def discard(self, worker_id: str, call: _Call) -> None:
        self.by_worker.get(worker_id, set()).discard(call)

    def cancel_all(self, worker_id: str) -> int:
        calls = self.by_worker.pop(worker_id, set())
        for c in calls:
            c.lost = True
            c.call.cancel()
        return len(calls)


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(
        self,
        config: SchedulerConfig,
        registry: WorkerRegistry,
        dispatcher: Dispatcher,
        prefixes: PrefixIndex,
        hints: PlacementHints,
        tier: TierClient | None = None,
    ) -> None:
        self.config = config
        self.tier = tier  # for Prefetch; None: no prefetching
        self._prefetches: set[asyncio.Task[None]] = set()
        self.registry = registry
        self.dispatcher = dispatcher
        self.prefixes = prefixes
        self.hints = hints
        self.channels = Channels()
        self.calls = _Calls()

    async def RegisterWorker(
        self, request: scheduler_pb2.RegisterWorkerRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.RegisterWorkerResponse:
        self.registry.register(convert.worker_from_proto(request))
        if request.tokenizer_path:
            self.prefixes.preload(request.tokenizer_path)
        log.info("worker %s registered (%s, model %s)", request.worker_id, request.device, request.model)
        self.dispatcher.kick()
        return scheduler_pb2.RegisterWorkerResponse(heartbeat_interval_s=self.config.heartbeat_interval_s)

    async def Heartbeat(
        self, request: scheduler_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.HeartbeatResponse:
        known = self.registry.heartbeat(request.worker_id, convert.load_from_proto(request.load))
        return scheduler_pb2.HeartbeatResponse(known=known)

    async def DeregisterWorker(
        self, request: scheduler_pb2.DeregisterWorkerRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.DeregisterWorkerResponse:
        # A draining worker finishes its streams: they are not cancelled here.
        info = self.registry.remove(request.worker_id)
        if info is not None:
            self.hints.forget(info.worker_id)
            log.info("worker %s deregistered", info.worker_id)
        return scheduler_pb2.DeregisterWorkerResponse()

    async def ListWorkers(
        self, request: scheduler_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListWorkersResponse:
        now = self.registry.clock()
        workers = [
            convert.worker_status(w, now, batch_limit(w, self.config)) for w in self.registry.workers.values()
        ]
        return scheduler_pb2.ListWorkersResponse(
            workers=workers, queued=len(self.dispatcher.queue), routing_policy=self.config.routing_policy
        )

    def _drop(self, worker: WorkerInfo, reason: str) -> None:
        """Removes a worker whose call broke, unless it registered anew since."""
        current = self.registry.workers.get(worker.worker_id)
        if current is not None and current.epoch == worker.epoch:
            self.registry.remove(worker.worker_id)
            self._forget(worker, reason)

    def _forget(self, worker: WorkerInfo, reason: str) -> None:
        """A worker left the registry: its calls in flight fail over (see the module docstring)."""
        self.hints.forget(worker.worker_id)
        cancelled = self.calls.cancel_all(worker.worker_id)
        log.warning(
            "worker %s dropped (%s); %d calls in flight fail over", worker.worker_id, reason, cancelled
        )
        self.dispatcher.kick()

    async def expire_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            for info in self.registry.expire():
                self._forget(info, "missed its heartbeats")
            self.dispatcher.kick()

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

    def _prefetch(self, hashes: list[BlockHash]) -> None:
        """Asks the tier, in the background, to promote these blocks from NVMe to CPU RAM."""
        if hashes and self.tier is not None:
            task = asyncio.create_task(self.tier.prefetch(hashes))
            self._prefetches.add(task)
            task.add_done_callback(self._prefetches.discard)

    async def _queued(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> QueuedRequest:
        workers = self.registry.resolve(request.model)  # no worker / unknown model: fail now
        model = workers[0].model
        prompt_tokens, prefix = await self.prefixes.describe(request.prompt, request.cache_salt, workers)
        return convert.queued_request(
            request,
            model=model,
            seq=self.dispatcher.next_seq(),
            now=self.registry.clock(),
            time_remaining=context.time_remaining(),
            prompt_tokens=prompt_tokens,
            prefix=prefix,
        )

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        request.request_id = request.request_id or uuid.uuid4().hex
        queued = await self._queued(request, context)
        self._prefetch(queued.prefix.to_prefetch())
        request.model = queued.model
        generated: list[int] = []  # the tokens the client has received
        for attempt in range(1, MAX_ATTEMPTS + 1):
            placed = await self.dispatcher.wait_for_worker(queued, requeue=attempt > 1)
            try:
                async for msg in self._relay(request, placed, context, generated):
                    generated += msg.token_ids
                    yield msg
                return
            except WorkerUnavailable as exc:
                if attempt == MAX_ATTEMPTS and generated:
                    raise WorkerUnavailable(
                        f"worker {placed.worker.worker_id} failed while streaming request "
                        f"{request.request_id} (after {len(generated)} tokens, the last of {attempt} "
                        f"workers tried): {exc}"
                    ) from None
                if attempt == MAX_ATTEMPTS:
                    raise WorkerUnavailable(
                        f"request {request.request_id} failed on {attempt} workers; last: {exc}"
                    ) from None
                queued.exclude |= {placed.worker.worker_id}
                log.warning(
                    "request %s goes back to the queue (%d tokens streamed, resumed on the next worker): %s",
                    request.request_id, len(generated), exc,
                )  # fmt: skip

    async def _relay(
        self,
        request: inference_pb2.GenerateRequest,
        placed: Assignment,
        context: grpc.aio.ServicerContext,
        generated: list[int],
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        """The worker's stream (resuming after `generated` tokens, if any); a broken worker
        raises WorkerUnavailable (and is dropped)."""
        worker = placed.worker
        stub = self.channels.stub(worker.address)
        if generated:
            resume = worker_pb2.ResumeRequest(request=request, generated_token_ids=generated)
            call = _Call(stub.Resume(resume, timeout=context.time_remaining()))
        else:
            call = _Call(stub.Generate(request, timeout=context.time_remaining()))
        self.calls.add(worker.worker_id, call)
        try:
            async for msg in call.call:
                yield msg
        except grpc.aio.AioRpcError as exc:
            if call.lost:  # cancelled by _forget: CANCELLED here means the worker is gone
                raise WorkerUnavailable("the worker was dropped from the registry") from None
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            self._drop(worker, f"its stream broke: {exc.details()}")
            raise WorkerUnavailable(exc.details() or "worker unreachable") from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not call.lost or (task is not None and task.cancelling()):
                raise
            raise WorkerUnavailable("the worker was dropped from the registry") from None
        finally:
            self.calls.discard(worker.worker_id, call)
            call.call.cancel()
            self.dispatcher.finished(placed)
