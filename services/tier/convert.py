"""Protobuf <-> tier types that are the tier service's own (its statistics).

Blocks, hashes and observations cross the wire through `wicore.kv.wire`, the one
module both ends of the tier protocol use.
"""

from __future__ import annotations

from wicore.kv.wire import CODEC_TO_PROTO, TIER_TO_PROTO
from wicore.tier.manager import ManagerStats
from wicore.tier.store import TierStats
from wicore.v1 import tier_pb2


def tier_stats_to_proto(stats: TierStats, manager: ManagerStats) -> tier_pb2.TierStats:
    params = manager.params.get(stats.tier)
    return tier_pb2.TierStats(
        tier=TIER_TO_PROTO[stats.tier],
        capacity_bytes=stats.capacity_bytes,
        used_bytes=stats.used_bytes,
        blocks=stats.blocks,
        hits=stats.hits,
        misses=stats.misses,
        bytes_in=stats.bytes_in,
        bytes_out=stats.bytes_out,
        evictions=stats.evictions,
        codec=CODEC_TO_PROTO[stats.codec],
        pressure=stats.pressure,
        eviction_threshold=params.eviction_threshold if params else 0.0,
        time_decay_factor=params.time_decay_factor if params else 0.0,
    )


def stats_to_proto(stats: ManagerStats) -> tier_pb2.StatsResponse:
    return tier_pb2.StatsResponse(
        tiers=[tier_stats_to_proto(t, stats) for t in stats.tiers],
        redis_ok=stats.redis_ok,
        policy=stats.policy,
        blocks_demoted=stats.blocks_demoted,
        bytes_demoted=stats.bytes_demoted,
        blocks_promoted=stats.blocks_promoted,
        bytes_promoted=stats.bytes_promoted,
        corrupt_blocks=stats.corrupt_blocks,
        nvme_write_errors=stats.nvme_write_errors,
    )
