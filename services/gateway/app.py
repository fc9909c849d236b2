"""Gateway process: the public API in front of the scheduler."""

from __future__ import annotations

import grpc

from wicore.config import Config
from wicore.gateway.servicer import InferenceServicer
from wicore.server import CHANNEL_OPTIONS, ServiceServer
from wicore.v1 import inference_pb2_grpc, scheduler_pb2_grpc


async def serve(config: Config) -> None:
    gc = config.gateway
    server = ServiceServer("gateway", gc.host, gc.port, config.shutdown_grace_s)
    scheduler_address = f"{config.scheduler.host}:{config.scheduler.port}"
    async with grpc.aio.insecure_channel(scheduler_address, options=CHANNEL_OPTIONS) as channel:
        servicer = InferenceServicer(scheduler_pb2_grpc.SchedulerStub(channel), gc)
        server.add(inference_pb2_grpc.add_InferenceServicer_to_server, servicer, "wicore.v1.Inference")
        await server.start()
        await server.set_serving(True)
        await server.serve_until_signal()
