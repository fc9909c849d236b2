"""The Redis key layout shared by the services (docs/architecture.md, "Redis"); `ns` is
`redis.namespace`, `node` a tier service's `tier.node`.

{ns}:tier:{node}:blk:{hash}    that tier's record of a block (field `tier`: cpu | nvme)
{ns}:tier:{node}:a2cr:{tier}   its A²CR scores, one sorted set per storage tier
{ns}:tier:{node}:epoch         its sentinel: gone means Redis lost the tier's keys (flushed, restarted)
{ns}:res:{worker_id}           the block hashes on a worker's device (for routing)

Every tier service owns the keys under its name: several tiers (one per node) share one
Redis without sharing records, and the scheduler asks each worker's own tier. The braces
are a Redis Cluster hash tag: all of one tier's keys live in one slot, so the MULTI that
updates a block's record and its scores together is legal on a cluster too.
"""

from __future__ import annotations


def _tier_prefix(namespace: str, node: str) -> str:
    return f"{namespace}:tier:{{{node}}}"


def block_key(namespace: str, node: str, block_hash: str) -> str:
    return f"{_tier_prefix(namespace, node)}:blk:{block_hash}"


def block_pattern(namespace: str, node: str) -> str:
    # SCAN's glob treats '{' and '}' literally, but '[' would start a class: names have none.
    return f"{_tier_prefix(namespace, node)}:blk:*"


def score_key(namespace: str, node: str, tier: str) -> str:
    return f"{_tier_prefix(namespace, node)}:a2cr:{tier}"


def tier_sentinel_key(namespace: str, node: str) -> str:
    return f"{_tier_prefix(namespace, node)}:epoch"


def residency_key(namespace: str, worker_id: str) -> str:
    return f"{namespace}:res:{worker_id}"
