"""The gRPC server bootstrap every service shares.

ServiceServer(name, host, port)
  ├─ grpc.aio server with ErrorInterceptor (domain error -> status code),
  │  behind InternalTokenInterceptor on the internal services (see wicore.channels)
  ├─ a span per RPC when tracing is on (wicore.tracing), outermost
  ├─ TLS on its port when given server credentials (the gateway's public port)
  ├─ grpc.health.v1 (NOT_SERVING until the service calls set_serving(True)),
  │  also on a health-only Unix socket when asked (probes of a TLS port)
  ├─ reflection for every registered service
  └─ serve_until_signal(): SIGTERM/SIGINT -> NOT_SERVING, on_drain hooks,
     then stop(grace): in-flight calls get `grace` seconds to finish and
     are cancelled after that.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from wicore import tracing
from wicore.errors import WicoreError

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# gRPC binds with SO_REUSEPORT by default: a second service started on a taken port
# would share it silently. Without it, the bind fails and the service says so.
SERVER_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)]


# Trailing metadata on every status a service chose to send: a caller tells a service's
# answer (final) from a broken connection to it (the service died: worth retrying).
ANSWERED_KEY = "wicore-answered"


def answered(exc: grpc.aio.AioRpcError) -> bool:
    """Whether the failure is a WiCore service's answer, not a lost connection."""
    return any(key == ANSWERED_KEY for key, _ in exc.trailing_metadata() or ())


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    context.set_trailing_metadata(((ANSWERED_KEY, "1"),))
    if isinstance(exc, WicoreError):
        await context.abort(exc.code, str(exc))
    if isinstance(exc, grpc.aio.AioRpcError):
        # A downstream hop failed: keep its code and message.
        await context.abort(exc.code(), exc.details() or exc.code().name)
    log.exception("bug in %s", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}")


def _is_abort(exc: BaseException) -> bool:
    # context.abort() raises AbortError, which grpc turns into the status itself.
    return isinstance(exc, grpc.aio.AbortError | asyncio.CancelledError | GeneratorExit)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions escaping a servicer to status codes, in one place."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await inner_uu(request, context)
                except BaseException as exc:
                    if _is_abort(exc):
                        raise
                    await _abort_for(exc, context, method)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    async for item in inner_us(request, context):
                        yield item
                except BaseException as exc:
                    if _is_abort(exc):
                        raise
                    await _abort_for(exc, context, method)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary:
            inner_su = handler.stream_unary

            async def stream_unary(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await inner_su(request_iterator, context)
                except BaseException as exc:
                    if _is_abort(exc):
                        raise
                    await _abort_for(exc, context, method)

            return grpc.stream_unary_rpc_method_handler(
                stream_unary, handler.request_deserializer, handler.response_serializer
            )
        return handler


INTERNAL_TOKEN_KEY = "wicore-internal-token"  # the metadata key internal callers send their token in
HEALTH_PREFIX = "/grpc.health.v1.Health/"  # open to probes without a token


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that fails every call with UNAUTHENTICATED."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    args = (refuse, handler.request_deserializer, handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(*args)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(*args)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(*args)
    return grpc.stream_stream_rpc_method_handler(*args)


class InternalTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) every call without the internal token, but health checks."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        sent = dict(handler_call_details.invocation_metadata or ()).get(INTERNAL_TOKEN_KEY, "")
        if hmac.compare_digest(sent.encode() if isinstance(sent, str) else sent, self._token):
            return handler
        return _refusal(handler, f"{handler_call_details.method}: internal service; missing or wrong token")


class ServiceServer:
    """Owns one grpc.aio server, its health status and its shutdown.

    `credentials`: TLS on the port (None: plaintext). `internal_token`: callers must send it
    (see wicore.channels; "": everyone is let in). `health_socket`: a Unix socket path that
    serves grpc.health.v1 alone, in plaintext, for local probes of a TLS port."""

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        grace_s: float = 10.0,
        *,
        credentials: grpc.ServerCredentials | None = None,
        internal_token: str = "",
        health_socket: str = "",
    ) -> None:
        self.name = name
        self.address = f"{host}:{port}"
        self.grace_s = grace_s
        self.credentials = credentials
        interceptors: list[grpc.aio.ServerInterceptor] = [ErrorInterceptor()]
        if internal_token:
            interceptors.insert(0, InternalTokenInterceptor(internal_token))
        # Outermost: the RPC's span starts first and sees the status the others chose.
        interceptors[:0] = tracing.server_interceptors()
        self.server = grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.health_socket = health_socket
        self._probe: grpc.aio.Server | None = None
        self._service_names: list[str] = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        self._stopping = asyncio.Event()

    def add(self, add_fn: Callable[[Any, grpc.aio.Server], None], servicer: Any, full_name: str) -> None:
        add_fn(servicer, self.server)
        self._service_names.append(full_name)

    async def start(self) -> None:
        reflection.enable_server_reflection([*self._service_names, reflection.SERVICE_NAME], self.server)
        try:
            if self.credentials is not None:
                bound = self.server.add_secure_port(self.address, self.credentials)
            else:
                bound = self.server.add_insecure_port(self.address)
        except RuntimeError:  # grpcio's word for a failed bind
            bound = 0
        if bound == 0:
            raise OSError(f"{self.name}: cannot listen on {self.address} (is the port taken?)")
        await self.server.start()
        await self.set_serving(False)
        if self.health_socket:
            await self._start_probe()
        tls = " (TLS)" if self.credentials is not None else ""
        log.info("%s listening on %s%s", self.name, self.address, tls)

    async def _start_probe(self) -> None:
        """grpc.health.v1 alone on the Unix socket, sharing this server's health status."""
        path = Path(self.health_socket)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_socket():
            path.unlink()  # left by a process that died
        self._probe = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._probe)
        if self._probe.add_insecure_port(f"unix:{path}") == 0:
            raise OSError(f"{self.name}: cannot listen on unix:{path}")
        await self._probe.start()

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self._service_names[1:]):
            await self.health.set(name, status)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def request_stop(self) -> None:
        self._stopping.set()

    async def serve_until_signal(self, on_drain: Callable[[], Awaitable[None]] | None = None) -> None:
        """Serves until SIGTERM/SIGINT (or request_stop), then drains and stops."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        await self._stopping.wait()
        log.info("%s: shutting down (grace %.1fs)", self.name, self.grace_s)
        await self.set_serving(False)
        if on_drain is not None:
            await on_drain()
        if self._probe is not None:
            await self._probe.stop(0)
            Path(self.health_socket).unlink(missing_ok=True)
        await self.server.stop(self.grace_s)
        log.info("%s: stopped", self.name)


async def wait_for_serving(
    address: str, timeout_s: float, service: str = "", credentials: grpc.ChannelCredentials | None = None
) -> bool:
    """Polls grpc.health.v1 until SERVING or the timeout (over TLS when given `credentials`)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    channel = (
        grpc.aio.secure_channel(address, credentials)
        if credentials is not None
        else grpc.aio.insecure_channel(address)
    )
    async with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.aio.AioRpcError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.1)
