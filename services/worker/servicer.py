"""The worker's gRPC surface: convert, call the engine, convert back."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from wicore.errors import ModelNotFound
from wicore.v1 import inference_pb2, worker_pb2, worker_pb2_grpc
from wicore.worker.async_engine import AsyncEngine
from wicore.worker.convert import ModelDefaults, delta_to_proto, engine_request, resumed_request


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, engine: AsyncEngine, tokenizer: Any, model_id: str, defaults: ModelDefaults) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.defaults = defaults

    def _check_model(self, model: str) -> None:
        if model and model != self.model_id:
            raise ModelNotFound(f"model: this worker serves {self.model_id!r}, not {model!r}")

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        self._check_model(request.model)
        request_id = request.request_id or uuid.uuid4().hex
        request.request_id = request_id
        prompt_ids = await asyncio.to_thread(self.tokenizer.encode, request.prompt)
        engine_req = engine_request(request, prompt_ids, self.defaults)
        async for delta in self.engine.generate(engine_req, tuple(request.stop)):
            yield delta_to_proto(delta, request_id, self.model_id)

    async def Resume(
        self, request: worker_pb2.ResumeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        inner = request.request
        self._check_model(inner.model)
        request_id = inner.request_id or uuid.uuid4().hex
        generated = list(request.generated_token_ids)
        prompt_ids = await asyncio.to_thread(self.tokenizer.encode, inner.prompt)
        engine_req = resumed_request(inner, prompt_ids, generated, self.defaults)
        engine_req.request_id = request_id
        async for delta in self.engine.generate(engine_req, tuple(inner.stop), resumed=len(generated)):
            yield delta_to_proto(delta, request_id, self.model_id)

    async def Tokenize(
        self, request: inference_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.TokenizeResponse:
        self._check_model(request.model)
        ids = self.tokenizer.encode(request.text, add_special_tokens=request.add_special_tokens)
        tokens = self.tokenizer.convert_ids_to_tokens(ids)
        return inference_pb2.TokenizeResponse(token_ids=ids, tokens=tokens, model=self.model_id)
