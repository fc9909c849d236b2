"""The gRPC server bootstrap every service shares.

ServiceServer(name, host, port)
  ├─ grpc.aio server with ErrorInterceptor (domain error -> status code)
  ├─ grpc.health.v1 (NOT_SERVING until the service calls set_serving(True))
  ├─ reflection for every registered service
  └─ serve_until_signal(): SIGTERM/SIGINT -> NOT_SERVING, on_drain hooks,
     then stop(grace): in-flight calls get `grace` seconds to finish and
     are cancelled after that.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from wicore.errors import WicoreError

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
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


class ServiceServer:
    """Owns one grpc.aio server, its health status and its shutdown."""

    def __init__(self, name: str, host: str, port: int, grace_s: float = 10.0) -> None:
        self.name = name
        self.address = f"{host}:{port}"
        self.grace_s = grace_s
        self.server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=CHANNEL_OPTIONS)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        self._stopping = asyncio.Event()

    def add(self, add_fn: Callable[[Any, grpc.aio.Server], None], servicer: Any, full_name: str) -> None:
        add_fn(servicer, self.server)
        self._service_names.append(full_name)

    async def start(self) -> None:
        reflection.enable_server_reflection([*self._service_names, reflection.SERVICE_NAME], self.server)
        if self.server.add_insecure_port(self.address) == 0:
            raise OSError(f"{self.name}: cannot listen on {self.address}")
        await self.server.start()
        await self.set_serving(False)
        log.info("%s listening on %s", self.name, self.address)

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
        await self.server.stop(self.grace_s)
        log.info("%s: stopped", self.name)


async def wait_for_serving(address: str, timeout_s: float, service: str = "") -> bool:
    """Polls grpc.health.v1 until SERVING or the timeout."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with grpc.aio.insecure_channel(address) as channel:
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
