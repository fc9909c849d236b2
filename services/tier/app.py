"""Tier process: the CPU and NVMe tiers of spilled KV blocks, their Redis mirror, the cleanup
loop and the gRPC service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

import torch

from wicore.channels import internal_server
from wicore.config import Config, TierConfig
from wicore.errors import ConfigError
from wicore.metrics import MetricsServer, service_registry, start_metrics
from wicore.redis_server import fast_failing_client
from wicore.tier.manager import TierManager
from wicore.tier.metadata import BlockMetadata
from wicore.tier.metrics import TierCollector
from wicore.tier.nvme import keep_freed_memory
from wicore.tier.servicer import TierServicer
from wicore.v1 import tier_pb2_grpc

log = logging.getLogger(__name__)

REDIS_TIMEOUT_S = 0.5  # Redis is a mirror: a slow one must not stall RPCs
MAX_TICK_S = 1.0  # how often the loop retries Redis and flushes, at most this far apart


def check_tier_config(tc: TierConfig) -> None:
    """Raises ConfigError naming the first invalid tier setting."""
    if tc.cpu_capacity_bytes < 0 or tc.nvme_capacity_bytes < 0:
        raise ConfigError("tier.cpu_capacity_bytes / nvme_capacity_bytes: must be >= 0")
    if tc.cpu_capacity_bytes == 0 and tc.nvme_capacity_bytes == 0:
        raise ConfigError("tier.cpu_capacity_bytes and tier.nvme_capacity_bytes: at least one must be > 0")
    if not 0.0 < tc.low_watermark <= tc.high_watermark <= 1.0:
        raise ConfigError(
            f"tier.low_watermark / high_watermark: need 0 < low <= high <= 1, got {tc.low_watermark} / "
            f"{tc.high_watermark}"
        )
    if tc.io_depth < 1:
        raise ConfigError(f"tier.io_depth: must be >= 1, got {tc.io_depth}")


def nvme_root(config: Config) -> Path:
    return Path(config.tier.nvme_dir).expanduser() if config.tier.nvme_dir else config.state_path / "nvme"


async def run_maintenance(manager: TierManager, cleanup_interval_s: float) -> None:
    """Every tick: flush Redis (catching up after an outage); every cleanup interval: cleanup."""
    tick = min(MAX_TICK_S, cleanup_interval_s)
    next_cleanup = time.monotonic() + cleanup_interval_s
    while True:
        await asyncio.sleep(tick)
        try:
            if time.monotonic() >= next_cleanup:
                next_cleanup = time.monotonic() + cleanup_interval_s
                await manager.cleanup()
            else:
                await manager.flush()
        except Exception:  # a failed pass must not stop the next one
            log.exception("tier maintenance pass failed")


async def serve(config: Config) -> None:
    tc = config.tier
    check_tier_config(tc)
    torch.set_num_threads(1)  # codec work: one thread beside the event loop, on a shared machine
    keep_freed_memory()
    redis = fast_failing_client(config.redis, REDIS_TIMEOUT_S)
    metadata = BlockMetadata(redis, config.redis.namespace, tc.node)
    manager = TierManager(
        tc, config.a2cr_config, metadata, nvme_root(config) if tc.nvme_capacity_bytes else None
    )
    server = internal_server("tier", tc.host, tc.port, config)
    server.add(tier_pb2_grpc.add_TierServicer_to_server, TierServicer(manager, tc), "wicore.v1.Tier")
    maintenance: asyncio.Task[None] | None = None
    endpoint: MetricsServer | None = None
    try:
        recovered = await manager.recover()  # before serving: no write may race the index rebuild
        registry = service_registry([TierCollector(manager)])
        endpoint = await start_metrics("tier", config.observability, registry)
        await server.start()
        log.info("tier ready: %d blocks recovered from NVMe, redis_ok=%s", recovered, metadata.redis_ok)
        maintenance = asyncio.create_task(run_maintenance(manager, config.a2cr_config.cleanup_interval))
        await server.set_serving(True)
        await server.serve_until_signal()
    finally:
        if endpoint is not None:  # first: a scrape must not see the tiers emptied by shutdown
            await endpoint.stop()
        if maintenance is not None:
            maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await maintenance
        await manager.shutdown()
        await redis.aclose()
