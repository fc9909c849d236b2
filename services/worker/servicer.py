"""The worker's gRPC surface: convert, call the engine, convert back."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc

from wicore.errors import ModelNotFound
from wicore.v1 import inference_pb2, worker_pb2, worker_pb2_grpc
from wicore.worker.async_engine import AsyncEngine
from wicore.worker.convert import ModelDefaults, delta_to_proto, from_tokenized


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(
        self, engine: AsyncEngine, model_id: str, defaults: ModelDefaults, fingerprint: str, block_size: int
    ) -> None:
        self.engine = engine
        self.model_id = model_id
        self.defaults = defaults
        self.fingerprint = fingerprint
        self.block_size = block_size

    async def Generate(
        self, request: worker_pb2.TokenizedRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        options = request.request
        if options.model and options.model != self.model_id:
            raise ModelNotFound(f"model: this worker serves {self.model_id!r}, not {options.model!r}")
        request_id = options.request_id or uuid.uuid4().hex
        engine_req, resumed = from_tokenized(request, self.defaults, self.fingerprint, self.block_size)
        engine_req.request_id = request_id
        async for delta in self.engine.generate(engine_req, tuple(options.stop), resumed=resumed):
            yield delta_to_proto(delta, request_id, self.model_id)
