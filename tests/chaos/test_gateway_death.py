"""Chaos: kill -9 of the gateway with streams open.

What clients see: every open stream ends with UNAVAILABLE (the documented cost of losing
the gateway: the client reconnects and asks again). `wicore up` restarts the gateway, and
new requests succeed within RECOVERY_BOUND_S, on fresh channels and on the channel the
clients already had. Nothing leaks: the dead gateway's calls to the scheduler break, the
scheduler cancels its calls to the worker, and the worker aborts the requests; the
scheduler's `ListWorkers` then shows no request in flight and no block reserved, and the
worker's own heartbeats (newer than the kill) show nothing running and every KV block
free, long before the killed streams could have run to their ends.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from wicore.v1 import inference_pb2 as pb
from wicore.v1 import inference_pb2_grpc

from chaos_util import idle_since, port_of, read_all, worker_status
from stack import Stack, pid_listening_on, start_stack, until

STREAMS = 4
TOKENS = 3500  # the tiny model's context is 4096: each stream would run for thousands of steps
PRIMED = 40  # messages read from each stream before the kill (to measure the decode rate)
RECOVERY_BOUND_S = 90.0  # kill -9 to a new gateway answering, on a loaded 2-core machine
IDLE_BOUND_S = 10.0  # kill -9 to everything freed (fresh heartbeats included)


def long_request(i: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt=f"stream {i} about gateways", max_tokens=TOKENS, ignore_eos=True, cache_salt=f"g{i}",
        sampling=pb.SamplingParams(temperature=0.0),
    )  # fmt: skip


SHORT = pb.GenerateRequest(
    prompt="after the restart", max_tokens=8, sampling=pb.SamplingParams(temperature=0.0)
)


async def _answers(address: str) -> bool:
    """One short request through a fresh channel (so no reconnect backoff hides a restart)."""
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await inference_pb2_grpc.InferenceStub(channel).Generate(SHORT, timeout=10)
        except grpc.aio.AioRpcError:
            return False
    return reply.usage.completion_tokens == 8


async def _prime(calls: list[grpc.aio.UnaryStreamCall]) -> tuple[list[int], float]:
    """Reads PRIMED messages of each stream; (tokens received per stream, decode steps per second
    in the steady state, measured on stream 0 over its last PRIMED // 2 messages)."""
    received = [0] * len(calls)
    started = 0.0
    for n in range(PRIMED):
        if n == PRIMED // 2:
            started = time.monotonic()
        for i, call in enumerate(calls):
            msg = await call.read()
            assert msg is not grpc.aio.EOF and msg.token_ids, f"stream {i} ended early"
            received[i] += len(msg.token_ids)
    rate = (PRIMED - PRIMED // 2) / max(1e-3, time.monotonic() - started)
    return received, rate


@pytest.mark.slow
async def test_gateway_killed_streams_fail_unavailable_and_nothing_leaks(
    tmp_path: Path, tiny_llama_dir: Path, redis_url: str
) -> None:
    stack = await asyncio.to_thread(start_stack, tmp_path, str(tiny_llama_dir), redis_url)
    try:
        old_gateway = pid_listening_on(stack.proc.pid, port_of(stack.gateway))
        async with grpc.aio.insecure_channel(stack.gateway) as channel:
            client = inference_pb2_grpc.InferenceStub(channel)
            calls = [client.GenerateStream(long_request(i)) for i in range(STREAMS)]
            received, steps_per_s = await _prime(calls)
            assert [w.inflight for w in await worker_status(stack)] == [STREAMS]
            os.kill(old_gateway, signal.SIGKILL)
            killed_at = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*(read_all(c) for c in calls)), timeout=60)
            assert [r.code for r in results] == ["UNAVAILABLE"] * STREAMS, results

            await until(lambda: idle_since(stack, killed_at), "the worker and scheduler to free it all",
                        IDLE_BOUND_S)  # fmt: skip
            freed_after = time.monotonic() - killed_at
            left = min(TOKENS - r for r in received) / steps_per_s  # seconds the streams had left to run
            print(f"gateway kill: freed after {freed_after:.2f} s; the streams had >= {left:.1f} s left "
                  f"at {steps_per_s:.0f} steps/s")  # fmt: skip
            assert freed_after < left / 2, "freed no sooner than the requests ending by themselves"

            await until(lambda: _answers(stack.gateway), "a restarted gateway to answer", RECOVERY_BOUND_S)
            print(f"gateway kill: new requests answered {time.monotonic() - killed_at:.1f} s after the kill")
            assert "gateway exited with -9; restarting it" in stack.log()
            assert pid_listening_on(stack.proc.pid, port_of(stack.gateway)) != old_gateway
            # The clients' own channel reconnects by itself; several requests at once all succeed.
            replies = await asyncio.gather(
                *(client.Generate(SHORT, timeout=60, wait_for_ready=True) for _ in range(STREAMS))
            )
            assert {r.text for r in replies} == {replies[0].text}
            assert all(r.usage.completion_tokens == 8 for r in replies)
        await _assert_idle_now(stack)
        assert "Traceback" not in stack.log()
    finally:
        assert await asyncio.to_thread(stack.stop) == 0


async def _assert_idle_now(stack: Stack) -> None:
    moment = time.monotonic()
    await until(lambda: idle_since(stack, moment), "idle after the new requests", IDLE_BOUND_S)
