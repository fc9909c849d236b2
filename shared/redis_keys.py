"""The Redis key layout shared by the services (docs/architecture.md, "Redis"); `ns` is `redis.namespace`.

{ns}:blk:{hash}        the tier service's record of a block (field `tier`: cpu | nvme)
{ns}:a2cr:{tier}       the tier's A²CR scores, one sorted set per tier
{ns}:res:{worker_id}   the block hashes on a worker's device (for routing)
{ns}:tier:epoch        the tier's sentinel: gone means Redis lost the tier's keys (flushed, restarted)
"""

from __future__ import annotations


def block_key(namespace: str, block_hash: str) -> str:
    return f"{namespace}:blk:{block_hash}"


def block_pattern(namespace: str) -> str:
    return f"{namespace}:blk:*"


def score_key(namespace: str, tier: str) -> str:
    return f"{namespace}:a2cr:{tier}"


def tier_sentinel_key(namespace: str) -> str:
    return f"{namespace}:tier:epoch"


def residency_key(namespace: str, worker_id: str) -> str:
    return f"{namespace}:res:{worker_id}"
