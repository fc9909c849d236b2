"""The worker's gRPC surface: convert, call the engine, convert back."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc

from wicore import tracing
from wicore.errors import ModelNotFound
from wicore.logs import request_scope
from wicore.v1 import inference_pb2, worker_pb2, worker_pb2_grpc
from wicore.worker.async_engine import AsyncEngine
from wicore.worker.convert import ModelDefaults, delta_to_proto, from_tokenized
from wicore.worker.engine_types import RequestTimes
from wicore.worker.metrics import WorkerMetrics
from wicore.worker.output import Delta

_tracer = tracing.tracer(__name__)


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(
        self,
        engine: AsyncEngine,
        model_id: str,
        defaults: ModelDefaults,
        fingerprint: str,
        block_size: int,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics if metrics is not None else WorkerMetrics(model_id, engine)
        self.model_id = model_id
        self.defaults = defaults
        self.fingerprint = fingerprint
        self.block_size = block_size

    async def Generate(
        self, request: worker_pb2.TokenizedRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        options = request.request
        if options.model and options.model != self.model_id:
            raise ModelNotFound(f"model: this worker serves {self.model_id!r}, not {options.model!r}")
        request_id = options.request_id or uuid.uuid4().hex
        engine_req, resumed = from_tokenized(request, self.defaults, self.fingerprint, self.block_size)
        engine_req.request_id = request_id
        with request_scope(request_id):
            async for delta in self.engine.generate(engine_req, tuple(options.stop), resumed=resumed):
                if delta.times is not None:
                    self.metrics.finished(delta.times)
                    if tracing.enabled():
                        _record_engine_spans(delta.times, delta)
                yield delta_to_proto(delta, request_id, self.model_id)


def _record_engine_spans(times: RequestTimes, last: Delta) -> None:
    """The request's time in the engine, as spans under this RPC's: queue, prefill, decode."""
    if not times.scheduled:
        return
    tracing.record_span(_tracer, "worker.queue", times.arrived, times.scheduled)
    if not times.first_token:
        return
    tracing.record_span(
        _tracer, "worker.prefill", times.scheduled, times.first_token,
        {"wicore.prompt_tokens": last.prompt_tokens, "wicore.cached_tokens": last.cached_tokens},
    )  # fmt: skip
    tracing.record_span(
        _tracer, "worker.decode", times.first_token, max(times.finished, times.first_token),
        {"wicore.completion_tokens": last.completion_tokens, "wicore.preemptions": times.preemptions,
         "wicore.finish_reason": last.finish_reason.value if last.finish_reason else ""},
    )  # fmt: skip
