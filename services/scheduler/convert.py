"""Protobuf <-> the scheduler's dataclasses, for the servicer only."""

from __future__ import annotations

from wicore.errors import InvalidRequest
from wicore.scheduler.registry import WorkerInfo, WorkerLoad
from wicore.scheduler.state import PrefixInfo, Priority, QueuedRequest
from wicore.v1 import inference_pb2, scheduler_pb2
from wicore.workload import parse_workload_type

PRIORITY_FROM_PROTO = {
    inference_pb2.PRIORITY_UNSPECIFIED: Priority.NORMAL,
    inference_pb2.PRIORITY_LOW: Priority.LOW,
    inference_pb2.PRIORITY_NORMAL: Priority.NORMAL,
    inference_pb2.PRIORITY_HIGH: Priority.HIGH,
    inference_pb2.PRIORITY_URGENT: Priority.URGENT,
}


def priority_from_proto(value: int) -> Priority:
    if value not in PRIORITY_FROM_PROTO:
        raise InvalidRequest("priority", f"unknown value {value}")
    return PRIORITY_FROM_PROTO[value]


def queued_request(
    request: inference_pb2.GenerateRequest,
    *,
    model: str,
    seq: int,
    now: float,
    time_remaining: float | None,
    prompt_tokens: int,
    prefix: PrefixInfo,
) -> QueuedRequest:
    return QueuedRequest(
        request_id=request.request_id,
        seq=seq,
        arrival=now,
        prompt_tokens=prompt_tokens,
        max_new_tokens=request.max_tokens if request.HasField("max_tokens") and request.max_tokens else None,
        priority=priority_from_proto(request.priority),
        workload=parse_workload_type(request.workload_type),
        model=model,
        deadline=None if time_remaining is None else now + time_remaining,
        prefix=prefix,
    )


def load_from_proto(msg: scheduler_pb2.WorkerLoad) -> WorkerLoad:
    return WorkerLoad(
        running=msg.running,
        waiting=msg.waiting,
        free_blocks=msg.free_blocks,
        loaded_blocks=dict(msg.loaded_blocks),
        spilled_blocks=msg.spilled_blocks,
        spill_failed_blocks=msg.spill_failed_blocks,
        spec_drafts=msg.spec_drafts,
        spec_proposed_tokens=msg.spec_proposed_tokens,
        spec_accepted_tokens=msg.spec_accepted_tokens,
        prefill_tokens_per_s=msg.prefill_tokens_per_s,
        load_s_per_block=dict(msg.load_s_per_block),
    )


def load_to_proto(load: WorkerLoad) -> scheduler_pb2.WorkerLoad:
    return scheduler_pb2.WorkerLoad(
        running=load.running,
        waiting=load.waiting,
        free_blocks=load.free_blocks,
        loaded_blocks=load.loaded_blocks,
        spilled_blocks=load.spilled_blocks,
        spill_failed_blocks=load.spill_failed_blocks,
        spec_drafts=load.spec_drafts,
        spec_proposed_tokens=load.spec_proposed_tokens,
        spec_accepted_tokens=load.spec_accepted_tokens,
        prefill_tokens_per_s=load.prefill_tokens_per_s,
        load_s_per_block=load.load_s_per_block,
    )


def worker_from_proto(msg: scheduler_pb2.RegisterWorkerRequest) -> WorkerInfo:
    return WorkerInfo(
        worker_id=msg.worker_id,
        address=msg.address,
        device=msg.device,
        model=msg.model,
        max_context=msg.max_context,
        total_blocks=msg.total_blocks,
        block_size=msg.block_size,
        max_batch_size=msg.max_batch_size,
        fingerprint=msg.fingerprint,
        default_max_tokens=msg.default_max_tokens or 256,
        tier_address=msg.tier_address,
        tier_node=msg.tier_node,
        load=load_from_proto(msg.load),
    )


def worker_status(w: WorkerInfo, now: float, batch_limit: int) -> scheduler_pb2.WorkerStatus:
    return scheduler_pb2.WorkerStatus(
        worker_id=w.worker_id,
        address=w.address,
        device=w.device,
        model=w.model,
        load=load_to_proto(w.load),
        inflight=w.inflight,
        seconds_since_heartbeat=now - w.last_seen,
        dispatched=w.dispatched,
        reserved_blocks=w.reserved_blocks,
        total_blocks=w.total_blocks,
        max_batch_size=batch_limit,
        tier_address=w.tier_address,
        tier_node=w.tier_node,
    )
