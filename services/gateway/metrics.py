"""The gateway's metrics: requests as the client sees them (vLLM's request metrics).

    wicore:request_success_total{finished_reason}      requests that finished (stop, length)
    wicore:request_failure_total{code}                 requests that failed, by gRPC status code name
                                                       (a client's cancel: CANCELLED)
    wicore:prompt_tokens_total, generation_tokens_total
    wicore:time_to_first_token_seconds                 request in → first token out (histogram)
    wicore:inter_token_latency_seconds                 between streamed messages with tokens (histogram)
    wicore:e2e_request_latency_seconds                 request in → last token out (histogram)
    wicore:request_prompt_tokens, request_generation_tokens   per request (histograms)
    wicore:gateway_requests_in_flight

Every metric but the last has the `model_name` label (one value: the served model).
Times are taken around the whole stream, tokenization and the scheduler's queue included.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from wicore.errors import WicoreError
from wicore.logs import request_scope
from wicore.metrics import (
    ITL_BUCKETS,
    PREFIX,
    REQUEST_LATENCY_BUCKETS,
    TOKEN_BUCKETS,
    TTFT_BUCKETS,
    service_registry,
)
from wicore.v1 import inference_pb2

log = logging.getLogger(__name__)

Stream = AsyncIterator[inference_pb2.GenerateStreamResponse]
FINISH_REASONS = {inference_pb2.FINISH_REASON_STOP: "stop", inference_pb2.FINISH_REASON_LENGTH: "length"}


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The status a failed request ends with (what its client sees)."""
    if isinstance(exc, WicoreError):
        return exc.code
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code()
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.INTERNAL


class GatewayMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else service_registry()
        labels = ["model_name"]

        def counter(name: str, doc: str, *extra: str) -> Counter:
            return Counter(f"{PREFIX}{name}", doc, [*labels, *extra], registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"{PREFIX}{name}", doc, labels, buckets=buckets, registry=r)

        self.success = counter(
            "request_success", "Requests that finished, by finish reason.", "finished_reason"
        )
        self.failure = counter("request_failure", "Requests that failed, by gRPC status code.", "code")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated (streamed to clients).")
        self.ttft = histogram("time_to_first_token_seconds", "Request in to first token out.", TTFT_BUCKETS)
        self.itl = histogram(
            "inter_token_latency_seconds", "Time between streamed messages with tokens.", ITL_BUCKETS
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds", "Request in to last token out.", REQUEST_LATENCY_BUCKETS
        )
        self.request_prompt_tokens = histogram(
            "request_prompt_tokens", "Prompt tokens per finished request.", TOKEN_BUCKETS
        )
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Generated tokens per finished request.", TOKEN_BUCKETS
        )
        self.in_flight = Gauge(
            f"{PREFIX}gateway_requests_in_flight", "Requests the gateway serves now.", registry=r
        )
        self.model_name = model_name
        # Children bound once: labels() costs a dict lookup and a lock per call.
        self._success = {code: self.success.labels(model_name, name) for code, name in FINISH_REASONS.items()}
        self._prompt = self.prompt_tokens.labels(model_name)
        self._generation = self.generation_tokens.labels(model_name)
        self._ttft = self.ttft.labels(model_name)
        self._itl = self.itl.labels(model_name)
        self._e2e = self.e2e.labels(model_name)
        self._request_prompt = self.request_prompt_tokens.labels(model_name)
        self._request_generation = self.request_generation_tokens.labels(model_name)
        for code in grpc.StatusCode:  # every code present from the start: rate() works from the first failure
            if code is not grpc.StatusCode.OK:
                self.failure.labels(model_name, code.name)

    async def observe(self, stream: Stream) -> Stream:
        """Relays `stream`, recording the request's latencies, tokens and outcome; the
        attributes also go on the current span (the RPC's or the HTTP request's)."""
        started = last = time.monotonic()
        first: float | None = None
        finished = False
        self.in_flight.inc()
        span = trace.get_current_span()
        try:
            async for msg in stream:
                now = time.monotonic()
                if msg.token_ids:
                    if first is None:
                        first = now
                        self._ttft.observe(now - started)
                        span.set_attribute("wicore.ttft_s", now - started)
                    else:
                        self._itl.observe(now - last)
                    last = now
                    self._generation.inc(len(msg.token_ids))
                if msg.finish_reason:
                    finished = True
                    self._finished(msg, started, now, span)
                yield msg
        except BaseException as exc:
            if finished:  # the client stopped reading after the last message: not a failure
                raise
            code = status_code(exc)
            self.failure.labels(self.model_name, code.name).inc()
            span.set_attribute("wicore.status", code.name)
            log.info("request failed after %.3f s: %s", time.monotonic() - started, code.name)
            raise
        finally:
            self.in_flight.dec()

    def _finished(
        self, msg: inference_pb2.GenerateStreamResponse, started: float, now: float, span: trace.Span
    ) -> None:
        reason = FINISH_REASONS[msg.finish_reason]
        self._success[msg.finish_reason].inc()
        self._e2e.observe(now - started)
        self._prompt.inc(msg.usage.prompt_tokens)
        self._request_prompt.observe(msg.usage.prompt_tokens)
        self._request_generation.observe(msg.usage.completion_tokens)
        with request_scope(msg.request_id):  # ids and counts only: never the prompt or the output
            log.info(
                "request %s finished (%s): %d prompt tokens (%d cached), %d generated, e2e %.3f s",
                msg.request_id, reason, msg.usage.prompt_tokens, msg.usage.cached_tokens,
                msg.usage.completion_tokens, now - started,
            )  # fmt: skip
        span.set_attributes(
            {
                "wicore.request_id": msg.request_id,
                "wicore.finish_reason": reason,
                "wicore.prompt_tokens": msg.usage.prompt_tokens,
                "wicore.completion_tokens": msg.usage.completion_tokens,
                "wicore.e2e_s": now - started,
            }
        )
