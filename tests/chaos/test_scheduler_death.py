"""Chaos: kill -9 of the scheduler with streams running. `wicore up` restarts it, the
workers register again by themselves, and the gateway sends each request again with
the tokens its client already has: every stream completes, token for token what an
undisturbed run gives, and nothing is sent twice."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import grpc
import pytest

from wicore.v1 import inference_pb2 as pb
from wicore.v1 import inference_pb2_grpc

from chaos_util import read_all
from stack import pid_listening_on, start_stack

STREAMS = 8
TOKENS = 200


def greedy(i: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt=f"request {i} about paged attention", max_tokens=TOKENS, ignore_eos=True,
        sampling=pb.SamplingParams(temperature=0.0),
    )  # fmt: skip


@pytest.mark.slow
async def test_scheduler_killed_mid_stream_loses_no_request(
    tmp_path: Path, tiny_llama_dir: Path, redis_url: str
) -> None:
    stack = await asyncio.to_thread(start_stack, tmp_path, str(tiny_llama_dir), redis_url)
    try:
        async with grpc.aio.insecure_channel(stack.gateway) as channel:
            client = inference_pb2_grpc.InferenceStub(channel)
            calls = [client.GenerateStream(greedy(i)) for i in range(STREAMS)]
            first = await calls[0].read()  # type: ignore[attr-defined]
            assert first.token_ids
            scheduler_port = int(stack.scheduler.rsplit(":", 1)[1])
            os.kill(pid_listening_on(stack.proc.pid, scheduler_port), signal.SIGKILL)
            results = await asyncio.wait_for(asyncio.gather(*(read_all(c) for c in calls)), timeout=120)
            assert [r.code for r in results] == ["OK"] * STREAMS, results
            received = [list(first.token_ids) + results[0].token_ids] + [r.token_ids for r in results[1:]]
            texts = [first.text + results[0].text] + [r.text for r in results[1:]]
            assert "scheduler exited with -9; restarting it" in stack.log()
            assert "sending it again after" in stack.log()
            for i in range(STREAMS):  # the same requests, undisturbed
                reply = await client.Generate(greedy(i))
                assert received[i] == list(reply.token_ids), f"request {i}"
                assert texts[i] == reply.text, f"request {i}: text sent twice or lost"
    finally:
        assert stack.stop() == 0
