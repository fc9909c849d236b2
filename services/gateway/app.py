"""Gateway process: the public API (gRPC, and OpenAI-compatible HTTP) in front of
the scheduler. It loads the model's tokenizer: prompts are tokenized here, once."""

from __future__ import annotations

import asyncio

from wicore.channels import InternalAuth, gateway_health_socket, gateway_server_credentials, internal_channel
from wicore.config import Config
from wicore.gateway.auth import KeyRing
from wicore.gateway.frontend import Frontend
from wicore.gateway.http_api import HttpFront
from wicore.gateway.metrics import GatewayMetrics
from wicore.gateway.prompts import PromptTokenizer
from wicore.gateway.servicer import InferenceServicer
from wicore.metrics import start_metrics
from wicore.model_files import resolve_model
from wicore.server import ServiceServer
from wicore.v1 import inference_pb2_grpc, scheduler_pb2_grpc


async def serve(config: Config) -> None:
    gc = config.gateway
    keys = KeyRing.from_config(gc)  # a bad key or keys file fails here, before the tokenizer loads
    source = resolve_model(config.worker.model, config.cache_path, config.worker.model_id)
    tokenizer = await asyncio.to_thread(PromptTokenizer.load, source.model_id, str(source.path))
    server = ServiceServer(
        "gateway",
        gc.host,
        gc.port,
        config.shutdown_grace_s,
        credentials=gateway_server_credentials(gc),
        health_socket=gateway_health_socket(config),
    )
    scheduler_address = f"{config.scheduler.host}:{config.scheduler.port}"
    async with internal_channel(scheduler_address, InternalAuth.load(config.internal)) as channel:
        metrics = GatewayMetrics(tokenizer.model_id)
        frontend = Frontend(scheduler_pb2_grpc.SchedulerStub(channel), gc, keys, tokenizer, metrics)
        server.add(
            inference_pb2_grpc.add_InferenceServicer_to_server,
            InferenceServicer(frontend),
            "wicore.v1.Inference",
        )
        endpoint = await start_metrics("gateway", config.observability, metrics.registry)
        await server.start()
        grace = config.shutdown_grace_s
        http = await HttpFront.start(frontend, gc, grace, server.request_stop) if gc.http_port else None
        await server.set_serving(True)
        try:
            await server.serve_until_signal(on_drain=http.stop if http else None)
        finally:
            if endpoint is not None:
                await endpoint.stop()
