"""The public `wicore.v1.Inference` service over gRPC: a few lines per RPC around
the `Frontend`, which HTTP shares. The unary RPCs join the very stream the
streaming ones relay, so the two always agree."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from wicore.gateway.auth import Tenant
from wicore.gateway.frontend import Frontend, collect
from wicore.v1 import inference_pb2, inference_pb2_grpc


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend

    def _tenant(self, context: grpc.aio.ServicerContext) -> Tenant:
        metadata = dict(context.invocation_metadata() or ())
        return self.frontend.authenticate(metadata.get("authorization"))

    def GenerateStream(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        return self.frontend.generate(request, self._tenant(context), context.time_remaining())

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        return await collect(self.GenerateStream(request, context))

    def ChatStream(
        self, request: inference_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        return self.frontend.chat(request, self._tenant(context), context.time_remaining())

    async def Chat(
        self, request: inference_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        return await collect(self.ChatStream(request, context))

    async def Tokenize(
        self, request: inference_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.TokenizeResponse:
        self._tenant(context)
        return await self.frontend.tokenize(request)

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        self._tenant(context)
        return await self.frontend.list_models(context.time_remaining())
