"""The tier service's metrics, read from `TierManager.stats()` at scrape time.

    wicore:tier_blocks{tier, codec}                blocks held (a promoted block counts in both tiers)
    wicore:tier_used_bytes{tier, codec}            bytes they take there
    wicore:tier_capacity_bytes{tier, codec}        the tier's configured capacity
    wicore:tier_hits_total{tier}, tier_misses_total{tier}          reads that found / missed a block
    wicore:tier_bytes_in_total{tier}, tier_bytes_out_total{tier}   bytes written to / read from it
    wicore:tier_evictions_total{tier}              blocks evicted from it to make room
    wicore:tier_corrupt_blocks_total{tier}         copies found damaged on read (deleted, never served)
    wicore:tier_demotions_total, tier_demoted_bytes_total      blocks moved CPU RAM → NVMe
    wicore:tier_promotions_total, tier_promoted_bytes_total    blocks copied NVMe → CPU RAM
    wicore:tier_write_errors_total                 writes a tier refused (no space, I/O error)
    wicore:redis_up                                1 while the Redis mirror answered its last write

`tier` is `cpu` or `nvme` (only the configured tiers appear), `codec` what the manager
encodes that tier's blocks in (`raw`, `fp16`, `bf16`, `q8`, `q4`). Nothing is counted
twice: the manager and its tiers keep the counts, this collector only reads them (on the
event loop, between handlers).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from wicore.metrics import PREFIX
from wicore.tier.manager import TierManager
from wicore.tier.store import TierStats

_LEVELS = (  # gauges by tier and codec: (name, help, field of TierStats)
    ("tier_blocks", "Blocks held in the tier.", "blocks"),
    ("tier_used_bytes", "Bytes the tier's blocks take.", "used_bytes"),
    ("tier_capacity_bytes", "The tier's capacity in bytes.", "capacity_bytes"),
)
_COUNTS = (  # counters by tier
    ("tier_hits", "Block reads the tier answered.", "hits"),
    ("tier_misses", "Block reads the tier could not answer.", "misses"),
    ("tier_bytes_in", "Bytes written to the tier.", "bytes_in"),
    ("tier_bytes_out", "Bytes read from the tier.", "bytes_out"),
    ("tier_evictions", "Blocks evicted from the tier to make room.", "evictions"),
    ("tier_corrupt_blocks", "Stored copies found damaged on read (deleted, never served).", "corrupt"),
)


def _int(stats: TierStats, field: str) -> int:
    value: int = getattr(stats, field)
    return value


class TierCollector(Collector):
    def __init__(self, manager: TierManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        stats = self.manager.stats()
        for name, doc, field in _LEVELS:
            gauge = GaugeMetricFamily(f"{PREFIX}{name}", doc, labels=["tier", "codec"])
            for t in stats.tiers:
                gauge.add_metric([t.tier.value, t.codec.value], _int(t, field))
            yield gauge
        for name, doc, field in _COUNTS:
            counter = CounterMetricFamily(f"{PREFIX}{name}", doc, labels=["tier"])
            for t in stats.tiers:
                counter.add_metric([t.tier.value], _int(t, field))
            yield counter
        for name, doc, value in (
            ("tier_demotions", "Blocks moved from CPU RAM down to NVMe.", stats.blocks_demoted),
            ("tier_demoted_bytes", "Bytes the blocks moved down take on NVMe.", stats.bytes_demoted),
            ("tier_promotions", "Blocks copied from NVMe up to CPU RAM.", stats.blocks_promoted),
            ("tier_promoted_bytes", "Bytes of the blocks copied up to CPU RAM.", stats.bytes_promoted),
            ("tier_write_errors", "Writes a tier refused (no space, I/O error).", stats.nvme_write_errors),
        ):
            yield CounterMetricFamily(f"{PREFIX}{name}", doc, value=value)
        yield GaugeMetricFamily(
            f"{PREFIX}redis_up",
            "1 while the Redis mirror answered its last call, else 0.",
            value=int(stats.redis_ok),
        )
