"""Cancel and abort free everything, through the whole stack: streams cancelled before
their first token (queued or in prefill) and mid-decode leave the worker's free KV
blocks, and the scheduler's reserved blocks and in-flight counts, exactly at their
idle values."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from wicore.v1 import inference_pb2 as pb
from wicore.v1 import inference_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

from stack import Stack, start_stack, until

LONG_PROMPT = "Paged attention keeps the KV cache in fixed-size blocks. " * 120  # chunked prefill


async def workers(stack: Stack) -> list[scheduler_pb2.WorkerStatus]:
    async with stack.internal_channel(stack.scheduler) as channel:
        reply = await scheduler_pb2_grpc.SchedulerStub(channel).ListWorkers(
            scheduler_pb2.ListWorkersRequest()
        )
    return list(reply.workers)


def idle(status: list[scheduler_pb2.WorkerStatus]) -> bool:
    return all(
        w.load.free_blocks == w.total_blocks and w.reserved_blocks == 0 and w.inflight == 0
        and w.load.running == 0 and w.load.waiting == 0
        for w in status
    )  # fmt: skip


@pytest.mark.slow
async def test_cancelled_streams_return_every_block(
    tmp_path: Path, tiny_llama_dir: Path, redis_url: str
) -> None:
    stack = await asyncio.to_thread(
        start_stack, tmp_path, str(tiny_llama_dir), redis_url, 1, {"worker.max_batch_size": 4}
    )
    try:
        before = await workers(stack)
        assert idle(before) and before[0].total_blocks > 0
        async with grpc.aio.insecure_channel(stack.gateway) as channel:
            client = inference_pb2_grpc.InferenceStub(channel)

            def stream(prompt: str, salt: str, max_tokens: int) -> grpc.aio.UnaryStreamCall:
                request = pb.GenerateRequest(
                    prompt=prompt, max_tokens=max_tokens, ignore_eos=True, cache_salt=salt
                )
                return client.GenerateStream(request)

            # Mid-decode: 4 running streams, each cancelled after a few tokens.
            decoding = [stream(f"decode {i}", f"d{i}", 3500) for i in range(4)]
            for call in decoding:
                for _ in range(3):
                    assert (await call.read()).token_ids  # type: ignore[attr-defined]
            # Before the first token: long prompts in prefill, and more waiting behind them.
            early = [stream(LONG_PROMPT + str(i), f"p{i}", 2000) for i in range(6)]
            await until(lambda: _running(stack), "the worker to report the running streams", 10.0)
            for call in [*early, *decoding]:
                call.cancel()
            cancelled_at = time.monotonic()
            for call in early:
                with pytest.raises(asyncio.CancelledError):
                    await call.read()  # type: ignore[attr-defined]
        # Far sooner than the streams could have run to their ends (thousands of tokens each),
        # as the worker's first heartbeats after the cancel say.
        await until(
            lambda: _idle_since(stack, cancelled_at), "blocks, reservations and counts back at idle", 2.0
        )
        after = await workers(stack)
        assert [w.load.free_blocks for w in after] == [w.total_blocks for w in before]
        assert "Traceback" not in stack.log()
    finally:
        assert stack.stop() == 0


async def _running(stack: Stack) -> bool:
    return any(w.load.running > 0 for w in await workers(stack))


async def _idle_since(stack: Stack, moment: float) -> bool:
    """Idle, by heartbeats sent at least 0.3 s after `moment` (heartbeats every 0.2 s)."""
    status = await workers(stack)
    fresh = all(time.monotonic() - w.seconds_since_heartbeat > moment + 0.3 for w in status)
    return fresh and idle(status)
