"""The worker's metrics: its engine, as vLLM's engine metrics, and its KV offload.

    wicore:num_requests_running, num_requests_waiting     in the engine's batch / queue now
    wicore:kv_cache_usage_perc                             share of the KV pool in use (0..1)
    wicore:prefix_cache_queries_total, prefix_cache_hits_total   prompt tokens of admitted
                                                           requests, and those found cached
    wicore:num_preemptions_total
    wicore:spec_decode_num_drafts_total, spec_decode_num_draft_tokens_total,
           spec_decode_num_accepted_tokens_total   speculative decoding (as vLLM's): steps that
                                                           verified proposals, tokens proposed, accepted
    wicore:request_{queue,prefill,decode,inference}_time_seconds   per finished request:
        queue = added → first scheduled, prefill = → first token, decode = first → last token,
        inference = prefill + decode
    wicore:kv_blocks_spilled_total, kv_blocks_spill_failed_total   blocks sent to / lost on the
                                                           way to the tier service
    wicore:kv_blocks_reloaded_total{source}                prefix blocks brought back, by source
                                                           (cpu, nvme, pending)
    wicore:kv_blocks_load_declined_total                   tier blocks recomputed: loading measured slower
    wicore:prefill_tokens_per_second, kv_block_load_seconds{source}   what this worker measured
                                                           (costs.py): the router prices tier hits by them

Gauges and counters are read from the engine's stats snapshot at scrape time (the engine
thread publishes one after every step); the histograms are observed as requests finish.
Every metric has the `model_name` label.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from wicore.kv.block import StorageTier
from wicore.metrics import PREFIX, REQUEST_LATENCY_BUCKETS, service_registry
from wicore.worker.async_engine import AsyncEngine
from wicore.worker.engine_types import RequestTimes


class EngineCollector(Collector):
    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats()
        labels = ["model_name"]
        model = [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"{PREFIX}{name}", doc, labels=labels)
            family.add_metric(model, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(f"{PREFIX}{name}", doc, labels=labels)
            family.add_metric(model, value)
            return family

        yield gauge("num_requests_running", "Requests in the engine's running batch.", stats.running)
        yield gauge("num_requests_waiting", "Requests waiting in the engine for admission.", stats.waiting)
        used = 1.0 - stats.free_blocks / stats.total_blocks if stats.total_blocks else 0.0
        yield gauge("kv_cache_usage_perc", "Share of the KV pool in use (1 = full).", used)
        yield counter("prefix_cache_queries", "Prompt tokens of admitted requests.", stats.prefix_queries)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.prefix_hits)
        yield counter(
            "num_preemptions", "Sequences preempted (their KV dropped, recomputed).", stats.preemptions
        )
        yield counter(
            "spec_decode_num_drafts", "Steps that verified speculative proposals.", stats.spec_drafts
        )
        yield counter(
            "spec_decode_num_draft_tokens", "Speculative tokens proposed and verified.", stats.spec_proposed
        )
        yield counter(
            "spec_decode_num_accepted_tokens", "Speculative tokens the model accepted.", stats.spec_accepted
        )
        yield gauge(
            "prefill_tokens_per_second", "Measured prompt tokens per second of prefill steps (0: not yet).",
            self.engine.costs.prefill_tokens_per_s,
        )  # fmt: skip
        offloader = self.engine.offloader
        if offloader is None:
            return
        offload = offloader.stats
        yield counter(
            "kv_blocks_spilled", "KV blocks the tier service took from this worker.", offload.spilled
        )
        yield counter(
            "kv_blocks_spill_failed", "KV blocks that could not be spilled (tier away, full queue).",
            offload.spill_failed,
        )  # fmt: skip
        reloaded = CounterMetricFamily(
            f"{PREFIX}kv_blocks_reloaded", "Prefix blocks loaded back instead of recomputed, by source.",
            labels=[*labels, "source"],
        )  # fmt: skip
        for tier in (StorageTier.CPU, StorageTier.NVME):
            reloaded.add_metric([self.model_name, tier.value], offload.loaded.get(tier, 0))
        reloaded.add_metric([self.model_name, "pending"], offload.loaded_pending)
        yield reloaded
        yield counter(
            "kv_blocks_load_declined", "Tier blocks recomputed because loading them measured slower.",
            offload.declined,
        )  # fmt: skip
        load_s = GaugeMetricFamily(
            f"{PREFIX}kv_block_load_seconds", "Measured seconds to load one KV block back, by source tier.",
            labels=[*labels, "source"],
        )  # fmt: skip
        for tier, seconds in self.engine.costs.load_seconds().items():
            load_s.add_metric([self.model_name, tier.value], seconds)
        yield load_s


class WorkerMetrics:
    def __init__(
        self, model_name: str, engine: AsyncEngine, registry: CollectorRegistry | None = None
    ) -> None:
        self.registry = registry if registry is not None else service_registry()
        self.registry.register(EngineCollector(engine, model_name))
        r, labels = self.registry, ["model_name"]

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(f"{PREFIX}{name}", doc, labels, buckets=REQUEST_LATENCY_BUCKETS, registry=r)

        self._queue = histogram("request_queue_time_seconds", "Added to the engine to first scheduled.")
        self._prefill = histogram("request_prefill_time_seconds", "First scheduled to first token.")
        self._decode = histogram("request_decode_time_seconds", "First token to last token.")
        self._inference = histogram("request_inference_time_seconds", "First scheduled to last token.")
        self._queue_m, self._prefill_m, self._decode_m, self._inference_m = (
            h.labels(model_name) for h in (self._queue, self._prefill, self._decode, self._inference)
        )

    def finished(self, times: RequestTimes) -> None:
        """A request left the engine with its last token (an aborted one never scheduled is skipped)."""
        if not times.scheduled or not times.first_token:
            return
        end = max(times.finished, times.first_token)
        self._queue_m.observe(times.scheduled - times.arrived)
        self._prefill_m.observe(times.first_token - times.scheduled)
        self._decode_m.observe(end - times.first_token)
        self._inference_m.observe(end - times.scheduled)
