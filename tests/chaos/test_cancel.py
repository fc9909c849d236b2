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
from wicore.v1 import inference_pb2_grpc

from chaos_util import idle, idle_since, worker_status
from stack import Stack, start_stack, until

LONG_PROMPT = "Paged attention keeps the KV cache in fixed-size blocks. " * 120  # chunked prefill


@pytest.mark.slow
async def test_cancelled_streams_return_every_block(
    tmp_path: Path, tiny_llama_dir: Path, redis_url: str
) -> None:
    stack = await asyncio.to_thread(
        start_stack, tmp_path, str(tiny_llama_dir), redis_url, 1, {"worker.max_batch_size": 4}
    )
    try:
        before = await worker_status(stack)
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
            lambda: idle_since(stack, cancelled_at), "blocks, reservations and counts back at idle", 2.0
        )
        after = await worker_status(stack)
        assert [w.load.free_blocks for w in after] == [w.total_blocks for w in before]
        assert "Traceback" not in stack.log()
    finally:
        assert stack.stop() == 0


async def _running(stack: Stack) -> bool:
    return any(w.load.running > 0 for w in await worker_status(stack))
