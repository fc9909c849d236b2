"""The scheduler's and the tier's metrics and spans, from real objects in process.

Metrics are scraped as Prometheus would (`generate_latest`, parsed back) and compared
exactly. Spans go to an in-memory exporter of a tracer provider made here (never the
process-wide one, which other tests must find unset).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import torch
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Tracer
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from wicore.config import A2crConfig, RedisConfig, SchedulerConfig, TierConfig
from wicore.kv.block import Codec, EncodedBlock, StorageTier
from wicore.kv.codecs import encode
from wicore.kv.hashing import BlockHash, reusable_chain
from wicore.kv.wire import block_chunks
from wicore.metrics import service_registry
from wicore.redis_keys import block_key
from wicore.redis_server import fast_failing_client
from wicore.scheduler import servicer as scheduler_servicer
from wicore.scheduler.batcher import BatchOptimizer
from wicore.scheduler.dispatcher import Dispatcher
from wicore.scheduler.hints import PlacementHints
from wicore.scheduler.metrics import RoutingOutcome, SchedulerMetrics, routing_outcome
from wicore.scheduler.prefix_index import PrefixIndex
from wicore.scheduler.registry import WorkerRegistry
from wicore.scheduler.request_queue import RequestQueue
from wicore.scheduler.router import MoRRouter, make_router
from wicore.scheduler.servicer import SchedulerServicer
from wicore.scheduler.state import PrefixInfo, Priority
from wicore.tier.manager import TierManager
from wicore.tier.metadata import BlockMetadata
from wicore.tier.metrics import TierCollector
from wicore.tier.nvme import HEADER_SIZE
from wicore.tier.servicer import TierServicer
from wicore.v1 import inference_pb2, tier_pb2, worker_pb2

from clocks import ManualClock
from scheduling import FP, NODE, hashes, request, worker

DEAD_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1
CPU, NVME = StorageTier.CPU, StorageTier.NVME
SHAPE = (1, 2, 16, 2, 32)  # float32: 8192 bytes raw
RAW_BYTES = 8192

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(registry: CollectorRegistry) -> Samples:
    """Every sample of a scrape, keyed by (sample name, labels)."""
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(k)[label]: v for (n, k), v in samples.items() if n == name}


class SpanRecorder:
    """A tracer of its own whose finished spans stay in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer: Tracer = provider.get_tracer("test")

    def spans(self) -> dict[str, ReadableSpan]:
        return {s.name: s for s in self.exporter.get_finished_spans()}

    def attributes(self, name: str) -> dict[str, Any]:
        attributes = self.spans()[name].attributes
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in (attributes or {}).items()}


# --- scheduler: the routing outcome, a pure function ---


def prefix_info(device: dict[str, int], tier: tuple[StorageTier | None, ...] = ()) -> PrefixInfo:
    return PrefixInfo(hashes(4), FP, 16, device, {NODE: tier or (None,) * 4})


@pytest.mark.parametrize(
    ("device", "tier", "cached", "resident", "expected"),
    [
        ({"a": 3, "b": 1}, (), 3, {}, RoutingOutcome.DEVICE_PREFIX),  # the chosen worker holds the most
        ({"a": 2, "b": 2}, (), 2, {}, RoutingOutcome.DEVICE_PREFIX),  # a tie is not "away"
        ({"a": 1, "b": 3}, (), 1, {}, RoutingOutcome.AWAY_FROM_PREFIX),  # b held more
        ({"a": 0, "b": 2}, (CPU, CPU, None, None), 0, {}, RoutingOutcome.AWAY_FROM_PREFIX),
        ({"a": 0, "b": 0}, (), 2, {}, RoutingOutcome.DEVICE_PREFIX),  # a's blocks known from hints only
        ({"a": 0, "b": 0}, (), 0, {"b": 2}, RoutingOutcome.AWAY_FROM_PREFIX),  # b's from the batcher's view
        ({"a": 0, "b": 0}, (NVME, CPU, None, None), 0, {}, RoutingOutcome.TIER_PREFIX),
        ({"a": 0, "b": 0}, (None, CPU, CPU, CPU), 0, {}, RoutingOutcome.NO_PREFIX),  # not the leading block
        ({}, (), 0, {}, RoutingOutcome.NO_PREFIX),  # Redis did not answer
    ],
)
def test_routing_outcome(
    device: dict[str, int],
    tier: tuple[StorageTier | None, ...],
    cached: int,
    resident: dict[str, int],
    expected: RoutingOutcome,
) -> None:
    a, b = worker("a"), worker("b")
    assert routing_outcome(prefix_info(device, tier), a, cached, [a, b], resident) is expected


def test_a_worker_gone_since_does_not_make_a_placement_look_away() -> None:
    a = worker("a")
    prefix = prefix_info({"a": 1, "gone": 4})
    assert routing_outcome(prefix, a, 1, [a, worker("b")]) is RoutingOutcome.DEVICE_PREFIX
    assert routing_outcome(prefix, a, 1, [a, worker("gone")]) is RoutingOutcome.AWAY_FROM_PREFIX
    assert routing_outcome(PrefixInfo(), a, 0, [a]) is RoutingOutcome.NO_PREFIX  # no tokenizer, no hashes


def test_the_batcher_hands_on_what_it_saw_of_each_candidate() -> None:
    config = SchedulerConfig()
    clock = ManualClock(100.0)
    registry = WorkerRegistry(5.0, clock)
    hints = PlacementHints(ttl_s=3.0)
    for w in (worker("a", "gpu:0"), worker("b")):
        registry.register(w)
    queue = RequestQueue(16, 5.0, clock)
    queue.push(request("r", blocks=4, device={"a": 0, "b": 4}))
    plan = BatchOptimizer(config, make_router(config), hints, 5.0).plan(clock.now, queue, registry)
    (placed,) = plan.assignments
    assert dict(placed.resident) == {"a": 0, "b": 4}
    assert placed.cached_blocks == (4 if placed.worker.worker_id == "b" else 0)


# --- scheduler: what a scrape reads from its state ---


async def test_queue_workers_and_lookup_failures_are_read_at_scrape_time() -> None:
    clock = ManualClock(100.0)
    registry = WorkerRegistry(5.0, clock)
    queue = RequestQueue(16, 5.0, clock)
    prefixes = PrefixIndex(RedisConfig(DEAD_REDIS, "x"), timeout_s=0.2, retry_after_s=60.0, clock=clock)
    metrics = SchedulerMetrics("least_loaded", queue, registry, prefixes)
    try:
        queue.push(request("n1", priority=Priority.NORMAL))
        queue.push(request("n2", priority=Priority.NORMAL))
        queue.push(request("u1", priority=Priority.URGENT))
        registry.register(worker("c1", inflight=2))
        registry.register(worker("g0", "gpu:0", inflight=1))
        registry.register(worker("g1", "gpu:1"))
        s = scrape(metrics.registry)
        depth = by_label(s, "wicore:scheduler_queue_depth", "priority")
        assert depth == {"low": 0, "normal": 2, "high": 0, "urgent": 1}
        assert by_label(s, "wicore:workers", "device") == {"cpu": 1, "gpu": 2}
        assert value(s, "wicore:scheduler_requests_running") == 3
        assert value(s, "wicore:prefix_lookup_failures_total") == 0

        queue.remove("u1")
        registry.remove("g0")
        assert await prefixes.lookup(["c1"], [NODE], []) == ({}, {})  # nothing to look up: no failure
        assert await prefixes.lookup(["c1"], [NODE], [hashes(1)[0]]) == ({}, {})  # refused
        assert await prefixes.lookup(["c1"], [NODE], [hashes(1)[0]]) == ({}, {})  # not asked: Redis rests
        s = scrape(metrics.registry)
        assert by_label(s, "wicore:scheduler_queue_depth", "priority")["urgent"] == 0
        assert by_label(s, "wicore:workers", "device") == {"cpu": 1, "gpu": 1}
        assert value(s, "wicore:scheduler_requests_running") == 2
        assert value(s, "wicore:prefix_lookup_failures_total") == 2
    finally:
        await prefixes.close()


async def test_placements_are_counted_by_policy_and_outcome() -> None:
    clock = ManualClock(100.0)
    registry, queue = WorkerRegistry(5.0, clock), RequestQueue(16, 5.0, clock)
    prefixes = PrefixIndex(RedisConfig(DEAD_REDIS, "x"), timeout_s=0.2)
    metrics = SchedulerMetrics("mor", queue, registry, prefixes)
    try:
        metrics.placed(0.003, RoutingOutcome.DEVICE_PREFIX)
        metrics.placed(0.2, RoutingOutcome.DEVICE_PREFIX)
        metrics.placed(30.0, RoutingOutcome.TIER_PREFIX)
        s = scrape(metrics.registry)
    finally:
        await prefixes.close()
    decisions = {
        dict(k)["outcome"]: v
        for (n, k), v in s.items()
        if n == "wicore:routing_decisions_total" and dict(k)["policy"] == "mor"
    }
    assert decisions == {"device_prefix": 2, "away_from_prefix": 0, "tier_prefix": 1, "no_prefix": 0}
    assert value(s, "wicore:scheduler_queue_time_seconds_count") == 3
    assert value(s, "wicore:scheduler_queue_time_seconds_sum") == pytest.approx(30.203)
    assert value(s, "wicore:scheduler_queue_time_seconds_bucket", le="0.005") == 1
    assert value(s, "wicore:scheduler_queue_time_seconds_bucket", le="0.25") == 2


class _Context:
    """What `_queued` asks of the gRPC context: no deadline."""

    def time_remaining(self) -> float | None:
        return None


async def test_a_placement_away_from_the_prefix_is_counted_and_traced(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker b holds the prompt's first 3 blocks but its batch is full: the request goes to a."""
    recorder = SpanRecorder()
    monkeypatch.setattr(scheduler_servicer, "_tracer", recorder.tracer)
    monkeypatch.setattr(scheduler_servicer, "enabled", lambda: True)
    ns = f"wicore-test-{uuid.uuid4().hex[:8]}"
    config = SchedulerConfig()
    registry, hints = WorkerRegistry(5.0), PlacementHints(ttl_s=3.0)
    queue = RequestQueue(config.max_queue_size, config.aging_interval_s, registry.clock)
    batcher = BatchOptimizer(config, make_router(config), hints, orphan_timeout_s=5.0)
    prefixes = PrefixIndex(RedisConfig(redis_url, ns), timeout_s=0.5)
    servicer = SchedulerServicer(config, registry, Dispatcher(registry, queue, batcher), prefixes, hints)
    registry.register(worker("a"))
    registry.register(worker("b", inflight=8))  # 8 of its 8 slots taken
    ids = list(range(1, 16 * 5 + 2))  # 81 tokens: 5 reusable blocks
    chain = reusable_chain(FP, "", ids, 16)
    client = aioredis.from_url(redis_url)
    try:
        await client.sadd(f"{ns}:res:b", *chain[:3])
        await client.hset(block_key(ns, NODE, chain[0]), "tier", "cpu")
        await client.hset(block_key(ns, NODE, chain[1]), "tier", "nvme")
        tokenized = worker_pb2.TokenizedRequest(
            request=inference_pb2.GenerateRequest(request_id="r1", max_tokens=8), prompt_token_ids=ids
        )
        queued = await servicer._queued(tokenized, _Context())
        placed = await servicer._place(queued, requeue=False)
        assert (placed.worker.worker_id, placed.cached_blocks) == ("a", 0)
        s = scrape(servicer.metrics.registry)
        servicer.dispatcher.finished(placed)
    finally:
        await client.delete(f"{ns}:res:b", *(block_key(ns, NODE, h) for h in chain))
        await client.aclose()
        await prefixes.close()
    assert value(s, "wicore:routing_decisions_total", policy="mor", outcome="away_from_prefix") == 1
    assert value(s, "wicore:routing_decisions_total", policy="mor", outcome="device_prefix") == 0
    assert value(s, "wicore:scheduler_queue_time_seconds_count") == 1
    assert value(s, "wicore:scheduler_requests_running") == 9

    assert set(recorder.spans()) == {"scheduler.prefix_lookup", "scheduler.queue", "scheduler.route"}
    assert recorder.attributes("scheduler.prefix_lookup") == {
        "wicore.prefix.blocks": 5,
        "wicore.prefix.device_blocks": 3,
        "wicore.prefix.cpu_blocks": 1,
        "wicore.prefix.nvme_blocks": 1,
    }
    assert recorder.attributes("scheduler.queue") == {
        "wicore.queue.priority": "normal",
        "wicore.worker_id": "a",
    }
    a_before = dataclasses.replace(registry.workers["a"], inflight=0, reserved_blocks=0)
    cost = MoRRouter(config).cost(queued, a_before, 0)
    assert recorder.attributes("scheduler.route") == {
        "wicore.routing.policy": "mor",
        "wicore.routing.outcome": "away_from_prefix",
        "wicore.worker_id": "a",
        "wicore.routing.cached_blocks": 0,
        "wicore.routing.cost.device": cost.device,
        "wicore.routing.cost.prefill": cost.prefill,
        "wicore.routing.cost.queue": 0.0,
        "wicore.routing.cost.total": cost.total,
    }
    assert cost.prefill == pytest.approx((81 - 16 * 2 + 16 * (0.2 + 0.5)) / 512)  # the tier's two blocks


# --- tier ---


def h(i: int) -> BlockHash:
    return BlockHash(f"{i:032x}")


def raw(i: int) -> EncodedBlock:
    return encode(torch.randn(SHAPE, generator=torch.Generator().manual_seed(i)), Codec.RAW, sink_tokens=0)


def tier_config(**changes: object) -> TierConfig:
    base = TierConfig(
        cpu_capacity_bytes=4 * RAW_BYTES,
        cpu_codec=Codec.RAW,
        nvme_capacity_bytes=0,
        nvme_codec=Codec.RAW,
        high_watermark=1.0,
        low_watermark=1.0,
    )
    return dataclasses.replace(base, **changes)


def tier_manager(
    tmp_path: Path, clock: ManualClock, metadata: BlockMetadata | None = None, **changes: object
) -> TierManager:
    tc = tier_config(**changes)
    nvme = tmp_path / "nvme" if tc.nvme_capacity_bytes else None
    return TierManager(tc, A2crConfig(), metadata, nvme, clock)


async def test_tier_levels_and_counts_move_with_puts_and_gets(tmp_path: Path) -> None:
    clock = ManualClock(100.0)
    manager = tier_manager(tmp_path, clock)
    registry = service_registry([TierCollector(manager)])
    s = scrape(registry)
    assert value(s, "wicore:tier_blocks", tier="cpu", codec="raw") == 0
    assert value(s, "wicore:tier_capacity_bytes", tier="cpu", codec="raw") == 4 * RAW_BYTES
    assert value(s, "wicore:redis_up") == 0  # no Redis mirror at all

    await manager.put([(h(0), raw(0)), (h(1), raw(1))])
    await manager.get([h(0), h(9)])
    s = scrape(registry)
    assert value(s, "wicore:tier_blocks", tier="cpu", codec="raw") == 2
    assert value(s, "wicore:tier_used_bytes", tier="cpu", codec="raw") == 2 * RAW_BYTES
    assert value(s, "wicore:tier_bytes_in_total", tier="cpu") == 2 * RAW_BYTES
    assert value(s, "wicore:tier_hits_total", tier="cpu") == 1
    assert value(s, "wicore:tier_misses_total", tier="cpu") == 1
    assert value(s, "wicore:tier_bytes_out_total", tier="cpu") == RAW_BYTES
    for name in ("evictions", "corrupt_blocks"):
        assert value(s, f"wicore:tier_{name}_total", tier="cpu") == 0
    for name in ("demotions", "demoted_bytes", "promotions", "promoted_bytes", "write_errors"):
        assert value(s, f"wicore:tier_{name}_total") == 0
    assert not any(dict(labels).get("tier") == "nvme" for _, labels in s)  # no NVMe tier configured


async def test_demotions_and_promotions_between_ram_and_nvme(tmp_path: Path) -> None:
    clock = ManualClock(100.0)
    manager = tier_manager(
        tmp_path, clock, cpu_capacity_bytes=RAW_BYTES, nvme_capacity_bytes=4 * (RAW_BYTES + HEADER_SIZE)
    )
    registry = service_registry([TierCollector(manager)])
    for i in (0, 1):
        clock.now += 1.0
        await manager.put([(h(i), raw(i))])
    s = scrape(registry)
    assert value(s, "wicore:tier_blocks", tier="cpu", codec="raw") == 1
    assert value(s, "wicore:tier_blocks", tier="nvme", codec="raw") == 1
    assert value(s, "wicore:tier_used_bytes", tier="nvme", codec="raw") == RAW_BYTES + HEADER_SIZE
    assert value(s, "wicore:tier_demotions_total") == 1
    assert value(s, "wicore:tier_demoted_bytes_total") == RAW_BYTES + HEADER_SIZE

    clock.now += 1.0
    assert [tier for _, _, tier in await manager.get([h(0)])] == [NVME]  # read from NVMe, promoted
    s = scrape(registry)
    assert value(s, "wicore:tier_hits_total", tier="nvme") == 1
    assert value(s, "wicore:tier_misses_total", tier="cpu") == 1
    assert value(s, "wicore:tier_promotions_total") == 1
    assert value(s, "wicore:tier_promoted_bytes_total") == RAW_BYTES
    assert value(s, "wicore:tier_demotions_total") == 2  # h(1) made room for it
    assert value(s, "wicore:tier_blocks", tier="nvme", codec="raw") == 2


async def test_redis_up_follows_the_mirror(tmp_path: Path, redis_url: str) -> None:
    namespace = f"wicore-test-{uuid.uuid4().hex}"
    client = fast_failing_client(redis_url, 0.5)
    manager = tier_manager(tmp_path, ManualClock(100.0), BlockMetadata(client, namespace))
    registry = service_registry([TierCollector(manager)])
    try:
        await manager.put([(h(0), raw(0))])
        assert value(scrape(registry), "wicore:redis_up") == 1
    finally:
        await manager.drop([h(0)])
        keys = [k async for k in client.scan_iter(match=f"{namespace}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def _chunks(blocks: Iterable[tuple[BlockHash, EncodedBlock]]) -> AsyncIterator[tier_pb2.BlockChunk]:
    for block_hash, block in blocks:
        for chunk in block_chunks(block_hash, block, 4096):
            yield chunk


def _hashes(*indexes: int) -> list[str]:
    return [h(i) for i in indexes]


async def test_tier_rpcs_put_what_they_did_on_their_span(tmp_path: Path) -> None:
    clock = ManualClock(100.0)
    tc = tier_config(cpu_capacity_bytes=RAW_BYTES, nvme_capacity_bytes=4 * (RAW_BYTES + HEADER_SIZE))
    manager = TierManager(tc, A2crConfig(), None, tmp_path / "nvme", clock)
    servicer = TierServicer(manager, tc)
    recorder = SpanRecorder()
    rpc = recorder.tracer.start_as_current_span  # the RPC's server span, as the interceptor makes it
    context: Any = None  # the handlers do not use it
    with rpc("put"):
        reply = await servicer.PutBlocks(_chunks([(h(0), raw(0)), (h(1), raw(1))]), context)
    assert (reply.stored, reply.evicted) == (2, 0)
    with rpc("lookup"):
        await servicer.Lookup(tier_pb2.LookupRequest(block_hashes=_hashes(0, 1, 7)), context)
    with rpc("get"):
        request = tier_pb2.GetBlocksRequest(block_hashes=_hashes(1, 0, 5))
        got = [chunk.header.block_hash async for chunk in servicer.GetBlocks(request, context)]
    assert got == [h(1), h(0)]  # one chunk each (chunk_bytes is 1 MiB)
    with rpc("prefetch"):
        await servicer.Prefetch(tier_pb2.PrefetchRequest(block_hashes=_hashes(0, 1, 6)), context)

    assert recorder.attributes("put") == {
        "wicore.tier.stored": 2,
        "wicore.tier.evicted": 0,
        "wicore.tier.bytes": 2 * RAW_BYTES,
        "wicore.tier.codec": "raw",
    }
    # h(1) in RAM, h(0) demoted to NVMe to make room for it.
    assert recorder.attributes("lookup") == {
        "wicore.tier.blocks_requested": 3,
        "wicore.tier.prefix_blocks": 2,
        "wicore.tier.cpu_blocks": 1,
        "wicore.tier.nvme_blocks": 1,
    }
    assert recorder.attributes("get") == {
        "wicore.tier.blocks_requested": 3,
        "wicore.tier.cpu_blocks": 1,
        "wicore.tier.nvme_blocks": 1,
        "wicore.tier.bytes": 2 * RAW_BYTES,
        "wicore.tier.codecs": ["raw"],
    }
    # The get promoted h(0) (demoting h(1)): the prefetch promotes h(1) back.
    assert recorder.attributes("prefetch") == {
        "wicore.tier.blocks_requested": 3,
        "wicore.tier.promoted": 1,
        "wicore.tier.already_cpu": 1,
        "wicore.tier.missing": 1,
    }
