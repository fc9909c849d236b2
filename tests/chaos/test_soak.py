"""Soak, short: REQUESTS mixed requests (benchmark/soak.py: unary, streams, chat streams,
early cancels, invalid input) through a whole stack, CONCURRENCY at once.

Asserted: every request ends as its kind expects (valid ones succeed, cancels are
cancelled, bad input gets INVALID_ARGUMENT); no service restarts; at the end the worker's
heartbeats and the scheduler show nothing held (no request in flight or running, no
reservation, every KV block free); and after warm-up (WARMUP requests) no service grows:
each one's open descriptors stay within FD_SLACK and its threads within THREAD_SLACK of
their warm-up values, at every sample and at the end, and its resident memory grows by
less than its RSS_GROWTH_BYTES.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from stack import start_stack

REQUESTS = 300
CONCURRENCY = 6
WARMUP = 100
# Bounded pools grow lazily after warm-up, so the slacks: Redis connection pools (one
# connection per concurrent command, measured +3 descriptors), asyncio's default executors
# (min(32, cores + 4) threads: measured +4 in the gateway), the tier's NVMe I/O threads
# (tier.io_depth). A per-request leak would exceed them many times over (200+ requests).
FD_SLACK = 8
THREAD_SLACK = 8
# Resident memory after warm-up. The worker's swings by up to ~130 MiB between samples (torch's
# freed activations kept by glibc's arenas; measured growth over this test: 19-50 MiB); the tier's
# CPU level fills up to tier.cpu_capacity_bytes (measured: 12-15 MiB); the others measured < 2 MiB.
RSS_GROWTH_BYTES = {"worker-0": 128 << 20, "tier": 48 << 20, "gateway": 32 << 20, "scheduler": 32 << 20}
SETTINGS = {
    "worker.kv_cache_bytes": 8 << 20,  # KV offload busy: prefixes spill to the tier
    "tier.cpu_capacity_bytes": 16 << 20,  # a cache fills up to its capacity: keep that small
    "tier.nvme_capacity_bytes": 256 << 20,
    "tier.io_depth": 4,
}


def load_soak() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "benchmark" / "soak.py"
    spec = importlib.util.spec_from_file_location("soak", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("soak", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_a_few_hundred_mixed_requests_leak_nothing(
    tmp_path: Path, tiny_llama_dir: Path, redis_url: str
) -> None:
    soak = load_soak()
    stack = await asyncio.to_thread(start_stack, tmp_path, str(tiny_llama_dir), redis_url, 1, SETTINGS)
    try:
        report = await soak.soak(stack, REQUESTS, CONCURRENCY, WARMUP, interval_s=0.5, seed=7)
    finally:
        assert await asyncio.to_thread(stack.stop) == 0, stack.log()[-3000:]
    print(soak.table(report))
    assert report.unexpected == 0, report.outcomes
    assert all(report.outcomes[kind] for kind in soak.KINDS), report.outcomes  # every kind was sent
    assert not report.restarted and report.idle_at_end
    for service, measures in report.services.items():
        fds, threads, rss = measures["fds"], measures["threads"], measures["rss_kib"]
        assert fds.max <= fds.warmup + FD_SLACK and fds.end <= fds.warmup + FD_SLACK, (service, fds)
        assert threads.max <= threads.warmup + THREAD_SLACK, (service, threads)
        assert threads.end <= threads.warmup + THREAD_SLACK, (service, threads)
        assert rss.growth * 1024 < RSS_GROWTH_BYTES[service], (service, rss)
