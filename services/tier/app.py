"""Tier process: the CPU tier of spilled KV blocks, its Redis mirror and its gRPC service."""

from __future__ import annotations

from wicore.config import Config
from wicore.server import ServiceServer
from wicore.tier.metadata import BlockMetadata, connect_redis
from wicore.tier.servicer import TierServicer
from wicore.tier.store import CpuTier
from wicore.v1 import tier_pb2_grpc


async def serve(config: Config) -> None:
    tc = config.tier
    store = CpuTier(tc.cpu_capacity_bytes)
    redis = connect_redis(config.redis.url)
    metadata = BlockMetadata(redis, config.redis.namespace)
    server = ServiceServer("tier", tc.host, tc.port, config.shutdown_grace_s)
    server.add(tier_pb2_grpc.add_TierServicer_to_server, TierServicer(store, metadata, tc), "wicore.v1.Tier")
    try:
        await server.start()
        await server.set_serving(True)
        await server.serve_until_signal()
        # The blocks live in this process's memory and leave with it.
        await metadata.forget(store.hashes())
    finally:
        await redis.aclose()
