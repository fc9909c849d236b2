"""Traces: OpenTelemetry spans in every service, W3C trace context over gRPC, OTLP export.

    client ─traceparent─▶ gateway ─▶ scheduler ─▶ worker ─▶ tier        one trace per request
                          (server span per RPC and client span per call: the official gRPC
                           instrumentation; spans of our own inside: queue wait, routing,
                           prefix reload, prefill, decode, tier operations)
    each process: TracerProvider ─▶ BoundedSpanProcessor ─▶ OTLP/gRPC ─▶ observability.otlp_endpoint

`setup_tracing` runs once per process, before its servers and channels exist; they ask
`enabled()` whether to add the interceptors. Without an endpoint nothing is set up: the
OpenTelemetry API's no-op tracer answers the few spans made by hand, no interceptor runs,
no thread starts.

Export never touches a request: a finished span is appended to a bounded queue, and one
thread sends batches. A dead or slow collector fills the queue; spans beyond it are
dropped and counted (`wicore:trace_spans_dropped_total`), and shutdown waits for the
exporter a bounded time.

Calls that are not part of a request are not traced: health checks, heartbeats and the
attention-score updates a worker sends in the background.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from wicore.config import ObservabilityConfig

log = logging.getLogger(__name__)

MAX_QUEUED_SPANS = 4096
EXPORT_BATCH = 512
EXPORT_INTERVAL_S = 1.0
EXPORT_TIMEOUT_S = 5.0  # one batch's export, retries included
SHUTDOWN_WAIT_S = 3.0
UNTRACED_METHODS = ("Heartbeat", "UpdateScores")

_state: _Tracing | None = None


@dataclass(slots=True)
class SpanCounts:
    """What became of the spans this process finished (read by its /metrics)."""

    exported: int = 0
    dropped: int = 0  # the queue was full (collector away or slow)
    failed: int = 0  # in a batch the collector did not take


class BoundedSpanProcessor(SpanProcessor):
    """Finished spans into a bounded queue; one thread exports them in batches (see module docstring).

    Written here rather than the SDK's BatchSpanProcessor so that drops are counted and
    shutdown is bounded."""

    def __init__(self, exporter: SpanExporter, max_queued: int = MAX_QUEUED_SPANS) -> None:
        self.exporter = exporter
        self.counts = SpanCounts()
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._max_queued = max_queued
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="span-export", daemon=True)
        self._thread.start()

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is None or not span.context.trace_flags.sampled:
            return
        with self._lock:
            if len(self._queue) >= self._max_queued or self._stopped:
                self.counts.dropped += 1
                return
            self._queue.append(span)
            if len(self._queue) >= EXPORT_BATCH:
                self._wake.set()

    def _take(self) -> list[ReadableSpan]:
        with self._lock:
            n = min(EXPORT_BATCH, len(self._queue))
            return [self._queue.popleft() for _ in range(n)]

    def _export(self) -> None:
        while batch := self._take():
            try:
                ok = self.exporter.export(batch) == SpanExportResult.SUCCESS
            except Exception:  # an exporter bug must not end the thread
                log.exception("exporting %d spans failed", len(batch))
                ok = False
            if ok:
                self.counts.exported += len(batch)
            else:
                self.counts.failed += len(batch)

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait(EXPORT_INTERVAL_S)
            self._wake.clear()
            self._export()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self._wake.set()
        deadline = time.monotonic() + timeout_millis / 1000
        while self._queue and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue

    def shutdown(self) -> None:
        """Sends what is queued, waiting at most SHUTDOWN_WAIT_S for the collector."""
        self.force_flush(int(SHUTDOWN_WAIT_S * 1000))
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=SHUTDOWN_WAIT_S)
        self.exporter.shutdown()


@dataclass(slots=True)
class _Tracing:
    provider: Any
    processor: BoundedSpanProcessor


def otlp_target(endpoint: str) -> str:
    """`host:port` means plaintext (`http://host:port`), as Jaeger's and collectors' OTLP ports
    usually are inside a cluster; `https://` asks for TLS."""
    return endpoint if "://" in endpoint else f"http://{endpoint}"


def setup_tracing(service: str, config: ObservabilityConfig, instance: str = "") -> bool:
    """Installs this process's tracer provider when an endpoint is set; True if it did."""
    global _state
    if not config.otlp_endpoint:
        return False
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    exporter = OTLPSpanExporter(endpoint=otlp_target(config.otlp_endpoint), timeout=EXPORT_TIMEOUT_S)
    attributes = {"service.name": f"wicore-{service}", "service.namespace": "wicore"}
    if instance:
        attributes["service.instance.id"] = instance
    provider = TracerProvider(
        resource=Resource.create(attributes), sampler=ParentBased(TraceIdRatioBased(config.sample_ratio))
    )
    processor = BoundedSpanProcessor(exporter)
    provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    _state = _Tracing(provider, processor)
    ratio = config.sample_ratio
    log.info("tracing: %s sends spans to %s (sample ratio %g)", service, config.otlp_endpoint, ratio)
    return True


def enabled() -> bool:
    return _state is not None


def span_counts() -> SpanCounts | None:
    return _state.processor.counts if _state is not None else None


def shutdown_tracing() -> None:
    """Exports what is left (bounded: a dead collector delays exit by SHUTDOWN_WAIT_S at most)."""
    global _state
    if _state is not None:
        _state.provider.shutdown()
        _state = None


def _traced() -> Any:
    """The instrumentation's filter: every call but health checks and UNTRACED_METHODS."""
    from opentelemetry.instrumentation.grpc import filters

    return filters.negate(
        filters.any_of(filters.health_check(), *(filters.method_name(m) for m in UNTRACED_METHODS))
    )


def server_interceptors() -> list[Any]:
    """The server span of each RPC, its context taken from the caller's `traceparent`."""
    if _state is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(filter_=_traced())]


def client_interceptors() -> Sequence[Any]:
    """The client span of each call, its context sent on as `traceparent` metadata."""
    if _state is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors(filter_=_traced()))


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def ns(wall_s: float) -> int:
    """A `time.time()` value as OpenTelemetry's nanoseconds."""
    return int(wall_s * 1e9)


def record_span(
    tracer_: trace.Tracer,
    name: str,
    start_s: float,
    end_s: float,
    attributes: dict[str, Any] | None = None,
    context: Context | None = None,
) -> None:
    """A span that already happened (times from `time.time()`), e.g. measured on the engine thread."""
    span = tracer_.start_span(name, context=context, start_time=ns(start_s), attributes=attributes)
    span.end(end_time=ns(max(start_s, end_s)))
