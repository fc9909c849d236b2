"""The OpenAI-compatible HTTP API, served by the gateway process beside gRPC.

    POST /v1/chat/completions, /v1/completions   JSON -> protos (openai_convert) -> Frontend
    GET  /v1/models, /v1/models/{id}             -> deltas -> JSON or SSE (openai_render)
    POST /tokenize (vLLM's), GET /health, /ready

This module owns the routes, the bearer header (checked by the Frontend, as for
gRPC), the error JSON with its status codes, and the server's lifetime: `serve_http`
runs uvicorn in the gateway's event loop, `HttpFront` ties it to the gRPC server.
The plumbing of one request (body limit, concurrent choices, SSE, cancellation when
the client goes away) is `http_streams.py`'s; what a request means is the Frontend's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import uvicorn
from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from wicore import tracing
from wicore.config import GatewayConfig
from wicore.errors import ModelNotFound, WicoreError
from wicore.gateway.auth import Tenant
from wicore.gateway.frontend import Frontend, Stream
from wicore.gateway.http_streams import (
    ChoiceStreams,
    ClientGone,
    Delta,
    SseResponse,
    read_body,
    until_disconnect,
)
from wicore.gateway.openai_convert import (
    ApiError,
    Call,
    TokenizeBody,
    api_error,
    chat_call,
    chat_messages,
    completion_call,
    parse_body,
)
from wicore.gateway.openai_render import SSE_DONE, Json, Renderer, TokenText, dumps, hf_token_bytes, sse
from wicore.gateway.prompts import Message
from wicore.gateway.validation import validate_chat
from wicore.v1 import inference_pb2

log = logging.getLogger(__name__)

LIST_MODELS_TIMEOUT_S = 5.0


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json", headers=headers)


@contextlib.contextmanager
def openai_errors(renames: dict[str, str] | None = None) -> Iterator[None]:
    """Domain and downstream errors as `ApiError`s, fields named as the client sent them."""
    try:
        yield
    except (WicoreError, grpc.aio.AioRpcError) as exc:
        raise api_error(exc, renames) from None


async def _collect(choices: ChoiceStreams, renderer: Renderer) -> None:
    while (delta := await choices.next()) is not None:
        renderer.add(*delta)


async def _events(renderer: Renderer, choices: ChoiceStreams, first: list[Delta]) -> AsyncIterator[bytes]:
    """The SSE body: role chunks (chat), the primed deltas, the rest, usage, [DONE]. An error
    after the 200 went out is sent as an `{"error": ...}` event, as vLLM does."""
    try:
        for chunk in renderer.role_chunks():
            yield sse(chunk)
        for primed in first:
            if (chunk := renderer.add(*primed)) is not None:
                yield sse(chunk)
        while (delta := await choices.next()) is not None:
            if (chunk := renderer.add(*delta)) is not None:
                yield sse(chunk)
        if renderer.call.include_usage:
            yield sse(renderer.usage_chunk())
    except (WicoreError, grpc.aio.AioRpcError) as exc:
        yield sse(api_error(exc, dict(renderer.call.renames)).body())
    yield SSE_DONE


class OpenAiRoutes:
    """The route handlers, over one Frontend."""

    def __init__(self, frontend: Frontend, config: GatewayConfig) -> None:
        self.frontend, self.config = frontend, config
        self.started = int(time.time())
        self.token_text = TokenText(hf_token_bytes(frontend.tokenizer.tokenizer))

    def _tenant(self, request: Request) -> Tenant:
        return self.frontend.authenticate(request.headers.get("authorization"))

    def _check_model(self, name: str | None) -> None:
        if name and name != self.frontend.model_id:
            raise ModelNotFound(f"model: {name!r} is not served here (served: {self.frontend.model_id!r})")

    async def chat(self, request: Request) -> Response:
        tenant = self._tenant(request)
        call = chat_call(await read_body(request, self.config.max_http_body_bytes))
        streams = [self.frontend.chat(r, tenant, None) for r in call.requests]
        return await self._answer(request, call, streams, chat=True)

    async def completions(self, request: Request) -> Response:
        tenant = self._tenant(request)
        with openai_errors():
            call = completion_call(await read_body(request, self.config.max_http_body_bytes))
        streams = [self.frontend.generate(r, tenant, None) for r in call.requests]
        return await self._answer(request, call, streams, chat=False)

    async def _answer(self, request: Request, call: Call, streams: list[Stream], chat: bool) -> Response:
        renderer = Renderer(call, chat, self.frontend.model_id, self.token_text)
        choices = ChoiceStreams(streams)
        try:
            with openai_errors(dict(call.renames)):
                if not call.stream:
                    await until_disconnect(request, _collect(choices, renderer))
                    return json_response(renderer.response())
                first = await until_disconnect(request, choices.prime())
        except BaseException:
            await choices.aclose()
            raise
        return SseResponse(_events(renderer, choices, first), on_close=choices.aclose)

    async def models(self, request: Request) -> Response:
        self._tenant(request)
        return json_response({"object": "list", "data": [await self._model_card()]})

    async def model(self, request: Request) -> Response:
        self._tenant(request)
        self._check_model(request.path_params["model"])
        return json_response(await self._model_card())

    async def _model_card(self) -> Json:
        reply = await self.frontend.list_models(LIST_MODELS_TIMEOUT_S)
        info = next((m for m in reply.models if m.id == self.frontend.model_id), None)
        return {
            "id": self.frontend.model_id,
            "object": "model",
            "created": self.started,
            "owned_by": "wicore",
            "max_model_len": info.max_context if info and info.max_context else None,
        }

    async def tokenize(self, request: Request) -> Response:
        self._tenant(request)
        body = parse_body(
            await read_body(request, self.config.max_http_body_bytes), TokenizeBody, "/tokenize"
        )
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "prompt: send either a prompt or messages", "prompt")
        with openai_errors({"text": "prompt"}):
            if body.prompt is not None:
                ids, strs = await self._tokenize_prompt(body)
            else:
                ids = await self._tokenize_chat(body)
                strs = list(self.frontend.tokenizer.tokenizer.convert_ids_to_tokens(ids))
        try:
            card = await self._model_card()
        except (WicoreError, grpc.aio.AioRpcError):
            card = {"max_model_len": None}
        tokens = {"count": len(ids), "max_model_len": card["max_model_len"], "tokens": ids}
        return json_response({**tokens, "token_strs": strs if body.return_token_strs else None})

    async def _tokenize_prompt(self, body: TokenizeBody) -> tuple[list[int], list[str]]:
        special = True if body.add_special_tokens is None else body.add_special_tokens
        request = inference_pb2.TokenizeRequest(
            model=body.model or "", text=body.prompt, add_special_tokens=special
        )
        reply = await self.frontend.tokenize(request)
        return list(reply.token_ids), list(reply.tokens)

    async def _tokenize_chat(self, body: TokenizeBody) -> list[int]:
        """The ids a chat request with these messages would send (the template's, turn opened)."""
        request = inference_pb2.ChatRequest(
            messages=chat_messages(body.messages or []),
            options=inference_pb2.GenerateRequest(model=body.model),
        )
        validate_chat(request, self.config)
        self._check_model(body.model)
        messages = [Message(m.role, m.content) for m in request.messages]
        return await asyncio.to_thread(self.frontend.tokenizer.render_chat, messages)

    async def health(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        if not await self.frontend.ready():
            raise ApiError(503, f"no live worker serves {self.frontend.model_id!r} yet")
        return json_response({"status": "ready"})


async def _on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    headers = {"connection": "close"} if exc.status == 413 else None  # the rest of the body is unread
    return json_response(exc.body(), exc.status, headers)


async def _on_domain_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, WicoreError | grpc.aio.AioRpcError)
    return await _on_api_error(request, api_error(exc))


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    response = await _on_api_error(request, ApiError(exc.status_code, message))
    response.headers.update(exc.headers or {})  # e.g. 405's Allow
    return response


async def _on_client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nobody reads it (nginx's "client closed request")


async def _on_bug(request: Request, exc: Exception) -> Response:
    log.error("bug in %s %s", request.method, request.url.path, exc_info=exc)
    return await _on_api_error(request, ApiError(500, f"internal error: {type(exc).__name__}"))


UNTRACED_PATHS = frozenset({"/health", "/ready"})


def build_app(frontend: Frontend, config: GatewayConfig) -> FastAPI:
    """The ASGI app of the HTTP API, over `frontend`."""
    # FastAPI's own OpenTelemetry support makes each request a server span that continues the
    # client's `traceparent` header, when tracing is on (wicore.tracing); probes are not traced,
    # and metrics are WiCore's own (GatewayMetrics), not FastAPI's.
    telemetry: TelemetryConfig = {
        "tracing": tracing.enabled(),
        "metrics": False,
        "logs": False,
        "operation_spans": False,
        "auto_configure": False,
        "exclude": lambda scope: scope.get("path") in UNTRACED_PATHS,
    }
    app = FastAPI(title="WiCore", docs_url=None, redoc_url=None, openapi_url=None, telemetry=telemetry)
    routes = OpenAiRoutes(frontend, config)
    app.add_route("/v1/chat/completions", routes.chat, methods=["POST"])
    app.add_route("/v1/completions", routes.completions, methods=["POST"])
    app.add_route("/v1/models", routes.models, methods=["GET"])
    app.add_route("/v1/models/{model:path}", routes.model, methods=["GET"])
    app.add_route("/tokenize", routes.tokenize, methods=["POST"])
    app.add_route("/health", routes.health, methods=["GET"])
    app.add_route("/ready", routes.ready, methods=["GET"])
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(WicoreError, _on_domain_error)
    app.add_exception_handler(grpc.aio.AioRpcError, _on_domain_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(ClientGone, _on_client_gone)
    app.add_exception_handler(Exception, _on_bug)
    return app


class _Server(uvicorn.Server):
    """uvicorn without signal handlers (the gateway's ServiceServer owns SIGTERM/SIGINT),
    telling `started` once it listens."""

    def __init__(self, config: uvicorn.Config, started: asyncio.Event | None) -> None:
        super().__init__(config)
        self._started = started

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self._started is not None:
            self._started.set()


def _tls(config: GatewayConfig) -> dict[str, Any]:
    """uvicorn's TLS settings from `gateway.tls_*` (none when unset); a client CA means mTLS."""
    if not config.tls_cert:
        return {}
    settings: dict[str, Any] = {"ssl_certfile": config.tls_cert, "ssl_keyfile": config.tls_key or None}
    if config.tls_client_ca:
        settings |= {"ssl_ca_certs": config.tls_client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return settings


def _listen(host: str, port: int) -> socket.socket:
    """The HTTP socket, bound here so that a taken port is an OSError (uvicorn would exit)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"gateway: cannot listen for HTTP on {host}:{port}: {exc.strerror}") from exc
    sock.setblocking(False)
    return sock


async def serve_http(
    app: FastAPI,
    config: GatewayConfig,
    stopping: asyncio.Event,
    grace_s: float = 10.0,
    started: asyncio.Event | None = None,
) -> None:
    """Serves `app` on `config.host:config.http_port` with uvicorn, in this event loop, until
    `stopping` is set; then stops accepting and gives running requests `grace_s` seconds."""
    settings = uvicorn.Config(
        app,
        host=config.host,
        port=config.http_port,
        log_level="warning",
        log_config=None,  # keep the gateway's logging as it is
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=max(1, math.ceil(grace_s)),
        **_tls(config),
    )
    server = _Server(settings, started)
    serving = asyncio.create_task(server.serve(sockets=[_listen(config.host, config.http_port)]))
    stop = asyncio.create_task(stopping.wait())
    try:
        await asyncio.wait({serving, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        server.should_exit = True
        stop.cancel()
        await serving


class HttpFront:
    """The HTTP API's lifetime beside the gRPC server: `start` returns once it listens; `stop`
    (the gRPC server's drain hook) stops it and waits; `on_exit` is called if it ends alone."""

    def __init__(self, task: asyncio.Task[None], stopping: asyncio.Event) -> None:
        self.task, self.stopping = task, stopping

    @classmethod
    async def start(
        cls, frontend: Frontend, config: GatewayConfig, grace_s: float, on_exit: Callable[[], None]
    ) -> HttpFront:
        stopping, started = asyncio.Event(), asyncio.Event()
        app = build_app(frontend, config)
        task = asyncio.create_task(serve_http(app, config, stopping, grace_s, started))
        waiter = asyncio.create_task(started.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if task.done():
            task.result()  # raises what stopped it
            raise RuntimeError("the HTTP server stopped as it started")
        task.add_done_callback(lambda _: None if stopping.is_set() else on_exit())
        scheme = "https" if _tls(config) else "http"
        log.info("OpenAI-compatible HTTP API on %s://%s:%d/v1", scheme, config.host, config.http_port)
        return cls(task, stopping)

    async def stop(self) -> None:
        self.stopping.set()
        await self.task
