"""The observability plumbing in one process: span export that never blocks, the /metrics
endpoint, JSON log lines, the settings and the ports `wicore up` hands out."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from otlp_receiver import OtlpReceiver
from prometheus_client import Counter
from prometheus_client.parser import text_string_to_metric_families

from wicore.cli import instance_id
from wicore.config import LogFormat, load_config
from wicore.errors import ConfigError
from wicore.launcher import metrics_ports
from wicore.logs import JsonFormatter, request_scope
from wicore.metrics import MetricsServer, service_registry
from wicore.tracing import BoundedSpanProcessor, otlp_target

from stack import free_port


def test_spans_reach_an_otlp_receiver_with_their_parents() -> None:
    with OtlpReceiver() as receiver:
        processor = BoundedSpanProcessor(OTLPSpanExporter(endpoint=otlp_target(receiver.endpoint)))
        provider = TracerProvider()
        provider.add_span_processor(processor)
        tracer = provider.get_tracer("test")
        with tracer.start_as_current_span("outer") as outer, tracer.start_as_current_span("inner"):
            pass
        provider.shutdown()
        spans = {s.name: s for s in receiver.snapshot()}
    assert spans["inner"].parent_id == spans["outer"].span_id == f"{outer.get_span_context().span_id:016x}"
    assert processor.counts.exported == 2 and processor.counts.dropped == processor.counts.failed == 0


def test_a_dead_collector_never_blocks_a_span_and_drops_are_counted() -> None:
    nobody = f"127.0.0.1:{free_port()}"
    processor = BoundedSpanProcessor(OTLPSpanExporter(endpoint=otlp_target(nobody), timeout=2), max_queued=10)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("test")
    started = time.monotonic()
    for i in range(50):
        with tracer.start_as_current_span(f"span {i}"):
            pass
    assert time.monotonic() - started < 0.5  # ending a span only queues it
    assert processor.counts.dropped >= 30  # the queue holds 10; the export thread took at most one batch
    started = time.monotonic()
    provider.shutdown()
    assert time.monotonic() - started < 10  # bounded: SHUTDOWN_WAIT_S for the flush and the thread
    assert processor.counts.exported == 0
    assert processor.counts.failed + processor.counts.dropped + len(processor._queue) == 50


def test_unsampled_spans_are_not_queued() -> None:
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    with OtlpReceiver() as receiver:
        processor = BoundedSpanProcessor(OTLPSpanExporter(endpoint=otlp_target(receiver.endpoint)))
        provider = TracerProvider(sampler=TraceIdRatioBased(0.0))
        provider.add_span_processor(processor)
        with provider.get_tracer("test").start_as_current_span("never"):
            pass
        provider.shutdown()
        assert receiver.snapshot() == []


def test_otlp_target_is_plaintext_unless_https_is_asked() -> None:
    assert otlp_target("jaeger:4317") == "http://jaeger:4317"
    assert otlp_target("https://collector.example:4317") == "https://collector.example:4317"


async def test_metrics_endpoint_serves_the_registry_and_nothing_else() -> None:
    registry = service_registry()
    hits = Counter("wicore:test_hits", "Hits.", registry=registry)
    hits.inc(3)
    port = free_port()
    server = MetricsServer(registry, "127.0.0.1", port, "test")
    await server.start()
    try:

        def get(path: str, method: str = "GET") -> tuple[int, str]:
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
            try:
                with urllib.request.urlopen(request, timeout=5) as reply:
                    return reply.status, reply.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()

        status, body = await asyncio.to_thread(get, "/metrics")
        assert status == 200
        samples = {s.name: s.value for family in text_string_to_metric_families(body) for s in family.samples}
        assert samples["wicore:test_hits_total"] == 3
        assert samples["process_resident_memory_bytes"] > 0
        assert (await asyncio.to_thread(get, "/"))[0] == 404
        assert (await asyncio.to_thread(get, "/metrics", "POST"))[0] == 405
        with pytest.raises(OSError, match=r"observability\.metrics_port"):
            await MetricsServer(registry, "127.0.0.1", port, "second").start()  # the port is taken
    finally:
        await server.stop()


def test_json_log_lines_carry_service_request_and_trace_ids() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("worker"))
    logger = logging.getLogger("wicore.test.json")
    logger.addHandler(handler)
    logger.propagate = False
    tracer = TracerProvider().get_tracer("test")
    try:
        logger.warning("outside %d", 1)
        with tracer.start_as_current_span("request") as span, request_scope("req-42"):
            logger.warning("inside")
    finally:
        logger.removeHandler(handler)
    outside, inside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (
        outside["service"] == "worker" and outside["message"] == "outside 1" and outside["level"] == "WARNING"
    )
    assert "request_id" not in outside and "trace_id" not in outside
    context = span.get_span_context()
    assert inside["request_id"] == "req-42"
    assert inside["trace_id"] == trace.format_trace_id(context.trace_id)
    assert inside["span_id"] == trace.format_span_id(context.span_id)


def test_observability_settings_are_checked() -> None:
    config = load_config(overrides={"observability.log_format": "json", "observability.sample_ratio": 0.25})
    assert config.observability.log_format is LogFormat.JSON and config.observability.sample_ratio == 0.25
    with pytest.raises(ConfigError, match=r"observability\.sample_ratio"):
        load_config(overrides={"observability.sample_ratio": 1.5})
    with pytest.raises(ConfigError, match=r"observability\.log_format"):
        load_config(overrides={"observability.log_format": "xml"})
    with pytest.raises(ConfigError, match=r"observability\.metrics_port"):
        load_config(overrides={"observability.metrics_port": 70000})
    with pytest.raises(ConfigError, match=r"observability\.otlp_endpoint"):
        load_config(overrides={"observability.otlp_endpoint": "ftp://jaeger:4317"})


def test_wicore_up_gives_each_service_its_own_metrics_port() -> None:
    assert metrics_ports(9400, 2) == {
        "gateway": 9400, "scheduler": 9401, "tier": 9402, "worker-0": 9403, "worker-1": 9404,
    }  # fmt: skip
    assert metrics_ports(0, 2) == {}  # off
    with pytest.raises(ConfigError, match=r"observability\.metrics_port"):
        metrics_ports(65534, 1)


async def test_a_request_scope_in_a_stream_closed_from_another_task_ends_quietly() -> None:
    """A cancelled call's stream is finalized outside the task that opened its scope."""

    async def stream() -> AsyncIterator[int]:
        with request_scope("req-7"):
            yield 1
            yield 2

    s = stream()

    async def first() -> int:
        return await anext(s)

    assert await asyncio.create_task(first()) == 1
    await s.aclose()  # another task's context: resetting the id there must not raise


def test_each_replica_has_its_own_trace_instance_id() -> None:
    """Pods bind 0.0.0.0 and share one config file: the id names the pod (its host name), and a
    worker by the address it advertises."""
    pod = load_config(None, {}, {"scheduler.host": "0.0.0.0"})
    assert instance_id(pod, "scheduler") == f"{socket.gethostname()}:50052"
    assert instance_id(load_config(), "tier") == "127.0.0.1:50053"
    worker = load_config(None, {}, {"worker.host": "0.0.0.0", "worker.advertise_address": "10.1.2.3:50060"})
    assert instance_id(worker, "worker") == "10.1.2.3:50060"
