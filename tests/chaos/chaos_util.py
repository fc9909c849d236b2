"""Helpers shared by the chaos tests: the scheduler's view of its workers, "idle" (nothing
leaked) by heartbeats newer than an event, reading a stream however it ends, and the
memory, descriptors and threads of a service process (from /proc)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from wicore.v1 import scheduler_pb2, scheduler_pb2_grpc

from stack import Stack, pid_listening_on

HEARTBEAT_MARGIN_S = 0.3  # start_stack's heartbeats come every 0.2 s


async def worker_status(stack: Stack) -> list[scheduler_pb2.WorkerStatus]:
    """The scheduler's `ListWorkers` (through the internal token)."""
    async with stack.internal_channel(stack.scheduler) as channel:
        reply = await scheduler_pb2_grpc.SchedulerStub(channel).ListWorkers(
            scheduler_pb2.ListWorkersRequest(), timeout=10
        )
    return list(reply.workers)


def idle(status: list[scheduler_pb2.WorkerStatus]) -> bool:
    """Nothing held anywhere: no request in flight or reserved in the scheduler, none running
    or waiting in a worker's engine, every KV block free."""
    return bool(status) and all(
        w.inflight == 0 and w.reserved_blocks == 0 and w.load.running == 0 and w.load.waiting == 0
        and w.load.free_blocks == w.total_blocks
        for w in status
    )  # fmt: skip


async def idle_since(stack: Stack, moment: float) -> bool:
    """Idle, by heartbeats every worker sent at least HEARTBEAT_MARGIN_S after `moment`
    (time.monotonic()), so the worker's part describes a state after the event."""
    status = await worker_status(stack)
    now = time.monotonic()
    fresh = all(now - w.seconds_since_heartbeat > moment + HEARTBEAT_MARGIN_S for w in status)
    return fresh and idle(status)


@dataclass
class StreamResult:
    """How one server stream ended, and what it carried."""

    code: str  # "OK" or the status code's name
    token_ids: list[int]
    text: str
    messages: int
    wire_bytes: int = 0  # the messages' bytes on the wire, gRPC framing included


async def read_all(call: grpc.aio.UnaryStreamCall) -> StreamResult:
    """Reads a stream to its end, whatever the end is."""
    result = StreamResult("OK", [], "", 0)
    text: list[str] = []
    try:
        while (msg := await call.read()) is not grpc.aio.EOF:
            result.token_ids += msg.token_ids
            text.append(msg.text)
            result.messages += 1
            result.wire_bytes += msg.ByteSize() + 5
    except grpc.aio.AioRpcError as exc:
        result.code = exc.code().name
    result.text = "".join(text)
    return result


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def service_pids(stack: Stack) -> dict[str, int]:
    """The pid of each of the stack's services (gateway, scheduler, tier, worker-i), as now."""
    addresses = {"gateway": stack.gateway, "scheduler": stack.scheduler, "tier": stack.tier}
    addresses |= {f"worker-{i}": a for i, a in enumerate(stack.workers)}
    return {name: pid_listening_on(stack.proc.pid, port_of(a)) for name, a in addresses.items()}


@dataclass(frozen=True)
class ProcSample:
    """One process's resident memory (KiB, VmRSS), open descriptors and threads."""

    rss_kib: int
    fds: int
    threads: int


def proc_sample(pid: int) -> ProcSample:
    """Reads /proc/PID/status and /proc/PID/fd; OSError if the process is gone."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return ProcSample(
        rss_kib=int(fields["VmRSS"].split()[0]),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=int(fields["Threads"]),
    )
