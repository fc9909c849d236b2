"""Prometheus metrics: each service's registry and its `/metrics` endpoint.

Every service owns one `CollectorRegistry` (never the global one: tests build several
services in one process) holding its own metrics (`wicore.<service>.metrics`), the
process' (RSS, CPU, open descriptors) and the tracer's span counts. `MetricsServer`
answers `GET /metrics` on `observability.metrics_host:metrics_port`, on the service's own
event loop, so collectors read the service's state between its handlers, never beside
them.

Names follow vLLM's (`vllm:x` → `wicore:x`, same meaning and unit) where vLLM has the
metric, so its dashboards and alerts port; the rest are WiCore's own (see
docs/observability.md for the list). Label values come from closed sets only (model
name, tier, codec, finish reason, status code, policy): never request ids or strings a
client chose.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Iterator
from http import HTTPStatus

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from wicore.config import ObservabilityConfig
from wicore.tracing import span_counts

log = logging.getLogger(__name__)

PREFIX = "wicore:"
MAX_REQUEST_BYTES = 8192

# vLLM's buckets, so that quantiles compare across the two.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class SpanCountCollector(Collector):
    """`wicore:trace_spans_{exported,dropped,failed}_total` of this process (none without tracing)."""

    def collect(self) -> Iterator[Metric]:
        counts = span_counts()
        if counts is None:
            return
        for name, value, doc in (
            ("exported", counts.exported, "Spans the collector took."),
            ("dropped", counts.dropped, "Spans dropped because the export queue was full."),
            ("failed", counts.failed, "Spans in batches the collector did not take."),
        ):
            yield CounterMetricFamily(f"{PREFIX}trace_spans_{name}", doc, value=value)


def service_registry(collectors: Iterable[Collector] = ()) -> CollectorRegistry:
    """A registry with the process' own metrics and the span counts, plus `collectors`."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(SpanCountCollector())
    for collector in collectors:
        registry.register(collector)
    return registry


class MetricsServer:
    """`GET /metrics` (the text format) on the running event loop; anything else gets 404."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int, service: str) -> None:
        self.registry = registry
        self.address = f"{host}:{port}"
        self.host, self.port, self.service = host, port, service
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True)
        except OSError as exc:
            raise OSError(
                f"{self.service}: cannot serve /metrics on {self.address} ({exc.strerror}); "
                "set observability.metrics_port (0: no metrics endpoint)"
            ) from None
        log.info("%s: metrics on http://%s/metrics", self.service, self.address)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            if len(head) > MAX_REQUEST_BYTES:
                raise ValueError("request head too large")
            method, target, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            path = target.split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                await _reply(writer, 405, b"only GET\n", "text/plain", head_only=False)
            elif path != "/metrics":
                await _reply(writer, 404, b"see /metrics\n", "text/plain", head_only=method == "HEAD")
            else:
                body = generate_latest(self.registry)
                await _reply(writer, 200, body, CONTENT_TYPE_LATEST, head_only=method == "HEAD")
        except (TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            with contextlib.suppress(ConnectionError):
                await _reply(writer, 400, b"bad request\n", "text/plain", head_only=False)
        except ConnectionError:
            pass
        except Exception:  # a collector's bug must not end the endpoint
            log.exception("%s: /metrics failed", self.service)
            with contextlib.suppress(ConnectionError):
                await _reply(writer, 500, b"collecting metrics failed\n", "text/plain", head_only=False)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _reply(
    writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str, head_only: bool
) -> None:
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode() + (b"" if head_only else body))
    await writer.drain()


async def start_metrics(
    service: str, config: ObservabilityConfig, registry: CollectorRegistry
) -> MetricsServer | None:
    """The service's endpoint, started; None when `observability.metrics_port` is 0."""
    if not config.metrics_port:
        return None
    server = MetricsServer(registry, config.metrics_host, config.metrics_port, service)
    await server.start()
    return server
