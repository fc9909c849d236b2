"""Builders for the scheduler's policy tests: workers and requests made by hand."""

from __future__ import annotations

from wicore.kv.block import StorageTier
from wicore.kv.hashing import BlockHash
from wicore.scheduler.registry import WorkerInfo, WorkerLoad
from wicore.scheduler.state import PrefixInfo, Priority, QueuedRequest
from wicore.workload import WorkloadType

FP = "fingerprint"
NODE = "local"  # the tier every hand-made worker uses, unless told otherwise


def hashes(n: int, tag: str = "p") -> tuple[BlockHash, ...]:
    return tuple(BlockHash(f"{tag}{i:031x}"[:32]) for i in range(n))


def worker(
    worker_id: str,
    device: str = "cpu",
    *,
    inflight: int = 0,
    total_blocks: int = 1000,
    reserved: int = 0,
    max_batch: int = 8,
    model: str = "m",
    tier_node: str = NODE,
) -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id,
        address=f"{worker_id}:1",
        device=device,
        model=model,
        max_context=4096,
        total_blocks=total_blocks,
        block_size=16,
        max_batch_size=max_batch,
        fingerprint=FP,
        default_max_tokens=256,
        tier_node=tier_node,
        inflight=inflight,
        reserved_blocks=reserved,
        load=WorkerLoad(free_blocks=total_blocks),  # as the worker reports an empty pool
    )


def request(
    request_id: str,
    *,
    seq: int = 0,
    arrival: float = 100.0,
    prompt: int = 64,
    new: int | None = 64,
    priority: Priority = Priority.NORMAL,
    workload: WorkloadType = WorkloadType.DEFAULT,
    deadline: float | None = None,
    blocks: int = 0,
    tag: str = "p",
    device: dict[str, int] | None = None,
    tier: tuple[StorageTier | None, ...] = (),
    node: str = NODE,
) -> QueuedRequest:
    """`tier`: where the tier named `node` holds each prompt block."""
    tiers = {node: tier} if tier else {}
    prefix = PrefixInfo(hashes(blocks, tag), FP, 16, device or {}, tiers) if blocks else PrefixInfo()
    return QueuedRequest(
        request_id=request_id,
        seq=seq,
        arrival=arrival,
        prompt_tokens=prompt,
        max_new_tokens=new,
        priority=priority,
        workload=workload,
        model="m",
        deadline=deadline,
        prefix=prefix,
    )
