"""The one path behind both public faces, gRPC (`servicer.py`) and OpenAI HTTP
(`http_api.py`): authenticate, validate, tokenize once, limit, then stream from
the scheduler.

    GenerateRequest ─ validate ─ encode(prompt) ───────────────┐
    ChatRequest ──── validate ─ chat template(messages) ───────┤
                                                               ▼
         TokenizedRequest(token ids, cache_salt folded with the tenant)
                                                               │
                             scheduler.Generate ◀──────────────┘  (stream of deltas)

A client's cancel or deadline ends the call to the scheduler, which ends the
call to the worker, which aborts the request there and frees its KV blocks. A
scheduler that dies costs no request: see `Frontend._relay`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from wicore.config import GatewayConfig
from wicore.errors import InvalidRequest, ModelNotFound, Overloaded
from wicore.gateway.auth import KeyRing, Tenant, fold_cache_salt
from wicore.gateway.metrics import GatewayMetrics
from wicore.gateway.prompts import Message, PromptTokenizer
from wicore.gateway.validation import validate_chat, validate_generate, validate_tokenize
from wicore.logs import request_scope
from wicore.server import answered
from wicore.tracing import tracer
from wicore.v1 import inference_pb2, scheduler_pb2_grpc, worker_pb2

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

Stream = AsyncIterator[inference_pb2.GenerateStreamResponse]
RETRY_BACKOFF_S = 0.1  # doubles up to 1 s while the scheduler is away


@dataclass(slots=True)
class _Inflight:
    total: int = 0
    by_tenant: dict[str, int] = field(default_factory=dict)


class Frontend:
    def __init__(
        self,
        scheduler: scheduler_pb2_grpc.SchedulerStub,
        config: GatewayConfig,
        keys: KeyRing,
        tokenizer: PromptTokenizer,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.config = config
        self.keys = keys
        self.tokenizer = tokenizer
        self.metrics = metrics if metrics is not None else GatewayMetrics(tokenizer.model_id)
        self._inflight = _Inflight()

    @property
    def model_id(self) -> str:
        return self.tokenizer.model_id

    def authenticate(self, authorization: str | None) -> Tenant:
        """The caller's tenant from an `authorization` value (`Bearer KEY`)."""
        return self.keys.authenticate(authorization)

    def _check_model(self, model: str) -> None:
        if model and model != self.model_id:
            raise ModelNotFound(f"model: {model!r} is not served here (served: {self.model_id!r})")

    def _apply_tenant_limits(self, options: inference_pb2.GenerateRequest, tenant: Tenant) -> None:
        """A tenant's max_tokens caps what it may ask for, and is what it gets when it asks nothing."""
        if not tenant.max_tokens:
            return
        if not options.HasField("max_tokens"):
            options.max_tokens = tenant.max_tokens
        elif options.max_tokens > tenant.max_tokens:
            raise InvalidRequest(
                "max_tokens",
                f"is {options.max_tokens}; tenant {tenant.name!r} may ask for at most {tenant.max_tokens}",
            )

    def generate(
        self, request: inference_pb2.GenerateRequest, tenant: Tenant, timeout: float | None
    ) -> Stream:
        """A completion of `request.prompt`, as a stream of deltas (the last has usage)."""
        return self.metrics.observe(self._generate(request, tenant, timeout))

    def chat(self, request: inference_pb2.ChatRequest, tenant: Tenant, timeout: float | None) -> Stream:
        """The assistant's answer to `request.messages`, as a stream of deltas."""
        return self.metrics.observe(self._chat(request, tenant, timeout))

    async def _generate(
        self, request: inference_pb2.GenerateRequest, tenant: Tenant, timeout: float | None
    ) -> Stream:
        validate_generate(request, self.config)
        self._check_model(request.model)
        with _tracer.start_as_current_span("gateway.tokenize"):
            ids = await asyncio.to_thread(self.tokenizer.encode, request.prompt)
        options = inference_pb2.GenerateRequest()
        options.CopyFrom(request)
        options.prompt = ""
        async for msg in self._run(options, ids, tenant, timeout):
            yield msg

    async def _chat(
        self, request: inference_pb2.ChatRequest, tenant: Tenant, timeout: float | None
    ) -> Stream:
        validate_chat(request, self.config)
        self._check_model(request.options.model)
        messages = [Message(m.role, m.content) for m in request.messages]
        with _tracer.start_as_current_span("gateway.tokenize"):
            ids = await asyncio.to_thread(self.tokenizer.render_chat, messages)
        async for msg in self._run(request.options, ids, tenant, timeout):
            yield msg

    async def _run(
        self, options: inference_pb2.GenerateRequest, ids: list[int], tenant: Tenant, timeout: float | None
    ) -> Stream:
        self._apply_tenant_limits(options, tenant)
        if not ids:
            raise InvalidRequest("prompt", "encodes to no tokens")
        internal = worker_pb2.TokenizedRequest(request=options, prompt_token_ids=ids)
        internal.request.request_id = options.request_id or uuid.uuid4().hex
        internal.request.model = self.model_id
        internal.request.cache_salt = fold_cache_salt(tenant, options.cache_salt)
        with self._admit(tenant), request_scope(internal.request.request_id):
            async for msg in self._relay(internal, timeout):
                yield msg

    async def _relay(self, internal: worker_pb2.TokenizedRequest, timeout: float | None) -> Stream:
        """The scheduler's stream. If the scheduler dies (the connection breaks: no answer of
        its own), the request is sent again once it is back, within `scheduler_retry_s`, with
        the tokens the client already has: it goes on where it stopped, nothing sent twice."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = None if timeout is None else started + timeout
        give_up = started + self.config.scheduler_retry_s
        backoff = RETRY_BACKOFF_S
        while True:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            call = self.scheduler.Generate(internal, timeout=remaining)
            try:
                async for msg in call:
                    internal.generated_token_ids.extend(msg.token_ids)
                    backoff = RETRY_BACKOFF_S
                    yield msg
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or answered(exc) or loop.time() >= give_up:
                    raise
                if backoff == RETRY_BACKOFF_S:  # once per outage, not at every try
                    log.warning(
                        "request %s: the scheduler is unreachable (%s); sending it again after %d tokens",
                        internal.request.request_id, exc.details(), len(internal.generated_token_ids),
                    )  # fmt: skip
            finally:
                call.cancel()
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, 1.0)

    def _admit(self, tenant: Tenant) -> _Slot:
        limit = self.config.max_concurrent_requests
        if self._inflight.total >= limit:
            raise Overloaded(f"the gateway is at its limit of {limit} requests")
        mine = self._inflight.by_tenant.get(tenant.name, 0)
        if tenant.max_concurrent_requests and mine >= tenant.max_concurrent_requests:
            limit = tenant.max_concurrent_requests
            raise Overloaded(f"tenant {tenant.name!r} is at its limit of {limit} concurrent requests")
        return _Slot(self._inflight, tenant.name)

    async def tokenize(self, request: inference_pb2.TokenizeRequest) -> inference_pb2.TokenizeResponse:
        validate_tokenize(request, self.config)
        self._check_model(request.model)
        ids, tokens = await asyncio.to_thread(self.tokenizer.tokens, request.text, request.add_special_tokens)
        return inference_pb2.TokenizeResponse(token_ids=ids, tokens=tokens, model=self.model_id)

    async def list_models(self, timeout: float | None) -> inference_pb2.ListModelsResponse:
        reply: inference_pb2.ListModelsResponse = await self.scheduler.ListModels(
            inference_pb2.ListModelsRequest(), timeout=timeout
        )
        return reply

    async def ready(self) -> bool:
        """True when a live worker serves this gateway's model."""
        try:
            reply = await self.list_models(timeout=2.0)
        except Exception:  # the scheduler is down or slow: not ready
            return False
        return any(m.id == self.model_id and m.workers > 0 for m in reply.models)


class _Slot:
    """Counts one request against the gateway's and its tenant's limits while it runs."""

    def __init__(self, inflight: _Inflight, tenant: str) -> None:
        self.inflight, self.tenant = inflight, tenant

    def __enter__(self) -> None:
        self.inflight.total += 1
        self.inflight.by_tenant[self.tenant] = self.inflight.by_tenant.get(self.tenant, 0) + 1

    def __exit__(self, *exc: object) -> None:
        self.inflight.total -= 1
        left = self.inflight.by_tenant[self.tenant] - 1
        if left:
            self.inflight.by_tenant[self.tenant] = left
        else:
            del self.inflight.by_tenant[self.tenant]


async def collect(stream: Stream) -> inference_pb2.GenerateResponse:
    """A whole response from a stream of deltas (what the unary RPCs return)."""
    reply = inference_pb2.GenerateResponse()
    text: list[str] = []
    async for msg in stream:
        reply.request_id, reply.model = msg.request_id, msg.model
        text.append(msg.text)
        reply.token_ids.extend(msg.token_ids)
        reply.logprobs.extend(msg.logprobs)
        if msg.finish_reason:
            reply.finish_reason = msg.finish_reason
            reply.usage.CopyFrom(msg.usage)
    reply.text = "".join(text)
    return reply
