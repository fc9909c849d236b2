"""The scheduler's gRPC surface: worker registry RPCs, and requests queued,
placed on a worker and relayed back.

Worker failure: a call to a worker that breaks (UNAVAILABLE: the process died,
the connection reset) or a worker dropped for missed heartbeats (its calls are
cancelled) removes that worker from the registry at once. The request goes back
to the queue, keeping its place, and is placed on another worker (at most
`MAX_ATTEMPTS` workers in all). One that had streamed tokens continues there
(`generated_token_ids`): the tokens the client already has are appended to its prompt,
so the stream goes on where it stopped (greedy output is the same as if nothing
had failed; a seeded sample continues with a fresh generator). After
`MAX_ATTEMPTS` workers it fails with UNAVAILABLE naming the last one.

Observability: `wicore.scheduler.metrics` (queue, placements, workers), and in the
Generate RPC's span, the spans `scheduler.prefix_lookup` (where the prompt's blocks
sit), `scheduler.queue` (the wait for a worker) and `scheduler.route` (the placement:
policy, outcome, and for MoR the chosen worker's cost terms, computed only when tracing).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import grpc

from wicore.channels import InternalAuth, internal_channel
from wicore.config import SchedulerConfig
from wicore.errors import InvalidRequest, WorkerUnavailable
from wicore.kv.block import StorageTier
from wicore.kv.client import TierClient
from wicore.kv.hashing import BlockHash
from wicore.logs import request_scope
from wicore.scheduler import convert
from wicore.scheduler.batcher import Assignment
from wicore.scheduler.dispatcher import Dispatcher
from wicore.scheduler.hints import PlacementHints
from wicore.scheduler.metrics import RoutingOutcome, SchedulerMetrics, routing_outcome
from wicore.scheduler.prefix_index import PrefixIndex
from wicore.scheduler.registry import WorkerInfo, WorkerRegistry
from wicore.scheduler.router import MoRRouter, batch_limit
from wicore.scheduler.state import PrefixInfo, QueuedRequest
from wicore.tracing import enabled, record_span, tracer
from wicore.v1 import inference_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

MAX_ATTEMPTS = 3
REGISTRATION_GRACE_HEARTBEATS = 3


class Channels:
    """One gRPC channel per worker address, reused when a worker comes back."""

    def __init__(self, auth: InternalAuth) -> None:
        self._auth = auth
        self._channels: dict[str, grpc.aio.Channel] = {}

    def stub(self, address: str) -> worker_pb2_grpc.WorkerStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = internal_channel(address, self._auth)
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
        prefetch: bool = False,  # ask workers' tiers to promote a queued prompt's NVMe blocks
        auth: InternalAuth | None = None,  # the token its calls to workers and tiers carry
        metrics: SchedulerMetrics | None = None,  # None: a registry of its own (served by no endpoint)
    ) -> None:
        self.config = config
        self.prefetch = prefetch
        self.tiers: dict[str, TierClient] = {}  # by address, made on first use, for Prefetch
        self._auth = auth or InternalAuth()
        self._prefetches: set[asyncio.Task[None]] = set()
        self.registry = registry
        self.dispatcher = dispatcher
        self.prefixes = prefixes
        self.hints = hints
        self.channels = Channels(self._auth)
        self.calls = _Calls()
        self.started = registry.clock()
        if metrics is None:
            metrics = SchedulerMetrics(config.routing_policy, dispatcher.queue, registry, prefixes)
        self.metrics = metrics

    async def RegisterWorker(
        self, request: scheduler_pb2.RegisterWorkerRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.RegisterWorkerResponse:
        self.registry.register(convert.worker_from_proto(request))
        log.info("worker %s registered (%s, model %s)", request.worker_id, request.device, request.model)
        self.dispatcher.kick()
        return scheduler_pb2.RegisterWorkerResponse(heartbeat_interval_s=self.config.heartbeat_interval_s)

    async def Heartbeat(
        self, request: scheduler_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.HeartbeatResponse:
        known = self.registry.heartbeat(
            request.worker_id, convert.load_from_proto(request.load), request.tier_node
        )
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

    def _prefetch(self, wanted: Mapping[str, list[BlockHash]]) -> None:
        """Asks each tier (by name), in the background, to promote these blocks from NVMe to
        CPU RAM; a tier is reached at the address its workers registered."""
        if not self.prefetch:
            return
        for node, hashes in wanted.items():
            address = self.registry.tier_address(node)
            if not address or not hashes:
                continue
            if address not in self.tiers:
                self.tiers[address] = TierClient(address, timeout_s=2.0, auth=self._auth)
            task = asyncio.create_task(self.tiers[address].prefetch(hashes))
            self._prefetches.add(task)
            task.add_done_callback(self._prefetches.discard)

    async def close(self) -> None:
        """Closes the channels to workers and tiers."""
        await self.channels.close_all()
        for client in self.tiers.values():
            await client.close()

    async def _queued(
        self, tokenized: worker_pb2.TokenizedRequest, context: grpc.aio.ServicerContext
    ) -> QueuedRequest:
        request = tokenized.request
        if not tokenized.prompt_token_ids:
            raise InvalidRequest("prompt_token_ids", "must not be empty")
        await self._registrations_after_start()
        workers = self.registry.resolve(request.model)  # no worker / unknown model: fail now
        model = workers[0].model
        with _tracer.start_as_current_span("scheduler.prefix_lookup") as span:
            prefix = await self.prefixes.describe(tokenized.prompt_token_ids, request.cache_salt, workers)
            if span.is_recording():
                span.set_attributes(_prefix_attributes(prefix))
        return convert.queued_request(
            request,
            model=model,
            seq=self.dispatcher.next_seq(),
            now=self.registry.clock(),
            time_remaining=context.time_remaining(),
            prompt_tokens=len(tokenized.prompt_token_ids) + len(tokenized.generated_token_ids),
            prefix=prefix,
        )

    async def _registrations_after_start(self) -> None:
        """Just after a (re)start no worker has registered yet; they do within a heartbeat or
        two. Requests arriving then (the gateway resends those a dead scheduler lost) wait
        for them instead of failing."""
        grace_end = self.started + REGISTRATION_GRACE_HEARTBEATS * self.config.heartbeat_interval_s + 1.0
        while not self.registry.workers and self.registry.clock() < grace_end:
            await asyncio.sleep(0.05)

    async def Generate(
        self, tokenized: worker_pb2.TokenizedRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        request = tokenized.request
        request.request_id = request.request_id or uuid.uuid4().hex
        with request_scope(request.request_id):
            queued = await self._queued(tokenized, context)
            self._prefetch(queued.prefix.to_prefetch())
            request.model = queued.model
            generated = list(tokenized.generated_token_ids)  # the tokens the client has received
            for attempt in range(1, MAX_ATTEMPTS + 1):
                placed = await self._place(queued, requeue=attempt > 1)
                try:
                    async for msg in self._relay(tokenized, queued.prefix, placed, context, generated):
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
                        "request %s goes back to the queue (%d tokens streamed, resumed on the next "
                        "worker): %s", request.request_id, len(generated), exc,
                    )  # fmt: skip

    async def _place(self, queued: QueuedRequest, *, requeue: bool) -> Assignment:
        """Waits for a worker (span `scheduler.queue`); counts and traces where the request went."""
        attributes = {"wicore.queue.priority": queued.priority.name.lower()}
        waited_from = time.monotonic()
        with _tracer.start_as_current_span("scheduler.queue", attributes=attributes) as span:
            placed = await self.dispatcher.wait_for_worker(queued, requeue=requeue)
            span.set_attribute("wicore.worker_id", placed.worker.worker_id)
        waited = time.monotonic() - waited_from
        live = self.registry.workers.values()
        outcome = routing_outcome(queued.prefix, placed.worker, placed.cached_blocks, live, placed.resident)
        self.metrics.placed(waited, outcome)
        if enabled():
            self._trace_route(placed, outcome)
        return placed

    def _trace_route(self, placed: Assignment, outcome: RoutingOutcome) -> None:
        """The span `scheduler.route`, recorded at placement (zero length: the decision was made
        in the dispatcher's plan). MoR's cost terms are those of the chosen worker, priced again
        with its load before this request (the router's view, unless it placed more there since)."""
        worker = placed.worker
        router = self.dispatcher.batcher.router
        attributes: dict[str, str | int | float] = {
            "wicore.routing.policy": router.name,
            "wicore.routing.outcome": outcome.value,
            "wicore.worker_id": worker.worker_id,
            "wicore.routing.cached_blocks": placed.cached_blocks,
        }
        if isinstance(router, MoRRouter):
            before = dataclasses.replace(
                worker,
                inflight=max(0, worker.inflight - 1),
                reserved_blocks=max(0, worker.reserved_blocks - placed.blocks),
            )
            cost = router.cost(placed.request, before, placed.cached_blocks)
            attributes |= {
                "wicore.routing.cost.device": cost.device,
                "wicore.routing.cost.prefill": cost.prefill,
                "wicore.routing.cost.queue": cost.queue,
                "wicore.routing.cost.total": cost.total,
            }
        now = time.time()
        record_span(_tracer, "scheduler.route", now, now, attributes)

    async def _relay(
        self,
        tokenized: worker_pb2.TokenizedRequest,
        prefix: PrefixInfo,
        placed: Assignment,
        context: grpc.aio.ServicerContext,
        generated: list[int],
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        """The worker's stream (resuming after `generated` tokens, if any); a broken worker
        raises WorkerUnavailable (and is dropped)."""
        worker = placed.worker
        stub = self.channels.stub(worker.address)
        call = _Call(
            stub.Generate(_for_worker(tokenized, prefix, worker, generated), timeout=context.time_remaining())
        )
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


def _prefix_attributes(prefix: PrefixInfo) -> dict[str, int]:
    """The `scheduler.prefix_lookup` span's attributes: the prompt's reusable blocks, the most
    any worker holds on its device, and how many the tier holds in RAM and on NVMe."""
    return {
        "wicore.prefix.blocks": len(prefix.hashes),
        "wicore.prefix.device_blocks": max(prefix.device.values(), default=0),
        "wicore.prefix.cpu_blocks": max(
            (tiers.count(StorageTier.CPU) for tiers in prefix.tiers.values()), default=0
        ),
        "wicore.prefix.nvme_blocks": max(
            (tiers.count(StorageTier.NVME) for tiers in prefix.tiers.values()), default=0
        ),
    }


def _for_worker(
    tokenized: worker_pb2.TokenizedRequest, prefix: PrefixInfo, worker: WorkerInfo, generated: list[int]
) -> worker_pb2.TokenizedRequest:
    """What `worker` gets: the request, the prompt's block hashes when they were made for its
    model and block size (so it does not hash them again), and the tokens already streamed."""
    msg = worker_pb2.TokenizedRequest(
        request=tokenized.request, prompt_token_ids=tokenized.prompt_token_ids, generated_token_ids=generated
    )
    if prefix.hashes and (prefix.fingerprint, prefix.block_size) == (worker.fingerprint, worker.block_size):
        msg.block_hashes.extend(prefix.hashes)
        msg.fingerprint, msg.block_size = prefix.fingerprint, prefix.block_size
    return msg
