"""The public `wicore.v1.Inference` service: authenticate, validate, limit
concurrency, then hand the request to the scheduler and relay its stream.

The unary `Generate` joins the same stream `GenerateStream` relays, so the two
always agree. A client's cancel or deadline ends the call to the scheduler,
which ends the call to the worker, which aborts the request there.
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import AsyncIterator

import grpc

from wicore.config import GatewayConfig
from wicore.errors import Overloaded, Unauthenticated
from wicore.gateway.validation import validate_generate, validate_tokenize
from wicore.v1 import inference_pb2, inference_pb2_grpc, scheduler_pb2_grpc


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, scheduler: scheduler_pb2_grpc.SchedulerStub, config: GatewayConfig) -> None:
        self.scheduler = scheduler
        self.config = config
        self.inflight = 0

    def _authenticate(self, context: grpc.aio.ServicerContext) -> None:
        if not self.config.api_keys:
            return
        metadata = dict(context.invocation_metadata() or ())
        value = metadata.get("authorization", "")
        token = value[7:] if value.lower().startswith("bearer ") else value
        if not any(hmac.compare_digest(token, key) for key in self.config.api_keys):
            raise Unauthenticated(
                "authorization: missing or unknown API key (send 'authorization: Bearer KEY')"
            )

    async def _stream(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        self._authenticate(context)
        validate_generate(request, self.config)
        if self.inflight >= self.config.max_concurrent_requests:
            raise Overloaded(f"the gateway is at its limit of {self.config.max_concurrent_requests} requests")
        request.request_id = request.request_id or uuid.uuid4().hex
        self.inflight += 1
        call = self.scheduler.Generate(request, timeout=context.time_remaining())
        try:
            async for msg in call:
                yield msg
        finally:
            self.inflight -= 1
            call.cancel()

    async def GenerateStream(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        async for msg in self._stream(request, context):
            yield msg

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        reply = inference_pb2.GenerateResponse()
        text: list[str] = []
        async for msg in self._stream(request, context):
            reply.request_id, reply.model = msg.request_id, msg.model
            text.append(msg.text)
            reply.token_ids.extend(msg.token_ids)
            reply.logprobs.extend(msg.logprobs)
            if msg.finish_reason:
                reply.finish_reason = msg.finish_reason
                reply.usage.CopyFrom(msg.usage)
        reply.text = "".join(text)
        return reply

    async def Tokenize(
        self, request: inference_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.TokenizeResponse:
        self._authenticate(context)
        validate_tokenize(request, self.config)
        reply: inference_pb2.TokenizeResponse = await self.scheduler.Tokenize(
            request, timeout=context.time_remaining()
        )
        return reply

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        self._authenticate(context)
        reply: inference_pb2.ListModelsResponse = await self.scheduler.ListModels(
            request, timeout=context.time_remaining()
        )
        return reply
