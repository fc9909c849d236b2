"""`wicore up` as a whole: SIGTERM drains in-flight streams and leaves no
process behind; a dead worker is dropped from the registry."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from wicore.server import wait_for_serving
from wicore.v1 import inference_pb2 as pb
from wicore.v1 import inference_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

from stack import alive, child_pids, free_port, pid_listening_on, start_stack


async def test_sigterm_drains_streams_and_leaves_no_process(
    tmp_path: Path, tiny_llama_dir: Path, redis_url: str
) -> None:
    stack = await asyncio.to_thread(start_stack, tmp_path, str(tiny_llama_dir), redis_url)
    pids = child_pids(stack.proc.pid)
    assert len(pids) >= 4  # tier, scheduler, worker, gateway (and their helpers)
    try:
        async with grpc.aio.insecure_channel(stack.gateway) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            request = pb.GenerateRequest(
                prompt="The quick brown fox", max_tokens=300, ignore_eos=True, sampling=pb.SamplingParams()
            )
            call = stub.GenerateStream(request)
            msgs = [await call.read()]
            stack.proc.send_signal(signal.SIGTERM)
            while (msg := await call.read()) is not grpc.aio.EOF:
                msgs.append(msg)
        # The stream in flight finished normally, within the grace period.
        assert msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert sum(len(m.token_ids) for m in msgs) == 300
    finally:
        started = time.monotonic()
        code = stack.stop(timeout_s=20)
    assert code == 0, stack.log()[-3000:]
    assert time.monotonic() - started < 15
    assert [p for p in pids if alive(p)] == []
    # Stopped in reverse order: the worker deregistered from a scheduler still serving.
    assert "could not deregister" not in stack.log(), stack.log()[-3000:]


async def test_killed_worker_is_dropped_then_restarted_and_rejoins(
    tmp_path: Path, tiny_llama_dir: Path, redis_url: str
) -> None:
    stack = await asyncio.to_thread(start_stack, tmp_path, str(tiny_llama_dir), redis_url)
    try:
        async with stack.internal_channel(stack.scheduler) as channel:
            sched = scheduler_pb2_grpc.SchedulerStub(channel)

            async def worker_ids() -> list[str]:
                reply = await sched.ListWorkers(scheduler_pb2.ListWorkersRequest())
                return [w.worker_id for w in reply.workers]

            (worker,) = (await sched.ListWorkers(scheduler_pb2.ListWorkersRequest())).workers
            port = int(worker.address.rsplit(":", 1)[1])
            worker_pid = pid_listening_on(stack.proc.pid, port)
            os.kill(worker_pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while await worker_ids():  # dropped after missing heartbeats (2 s here)
                assert time.monotonic() < deadline, "the dead worker was never dropped"
                await asyncio.sleep(0.05)
            deadline = time.monotonic() + 60
            while await worker_ids() != [worker.worker_id]:  # `up` restarted it; it registered again
                assert time.monotonic() < deadline, "the restarted worker never rejoined"
                await asyncio.sleep(0.2)
        assert "worker-0 exited with -9; restarting it" in stack.log()
        async with grpc.aio.insecure_channel(stack.gateway) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            reply = await stub.Generate(pb.GenerateRequest(prompt="hi", max_tokens=2, ignore_eos=True))
            assert reply.usage.completion_tokens == 2
    finally:
        assert stack.stop() == 0


async def test_no_worker_means_unavailable(tmp_path: Path, redis_url: str) -> None:
    """Scheduler and gateway alone, as processes: requests get UNAVAILABLE, named."""
    config = tmp_path / "c.yaml"
    gateway_port, scheduler_port = free_port(), free_port()
    gateway, scheduler = f"127.0.0.1:{gateway_port}", f"127.0.0.1:{scheduler_port}"
    config.write_text(
        f"gateway: {{port: {gateway_port}, http_port: 0}}\nscheduler: {{port: {scheduler_port}}}\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-m", f"wicore.{name}", "--config", str(config)])
        for name in ("scheduler", "gateway")
    ]
    try:
        for address in (scheduler, gateway):
            assert await wait_for_serving(address, timeout_s=60)
        async with grpc.aio.insecure_channel(gateway) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(pb.GenerateRequest(prompt="hi", max_tokens=2))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no worker is registered" in (err.value.details() or "")
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(timeout=15) for proc in procs] == [0, 0]
