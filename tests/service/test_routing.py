"""Two workers behind the scheduler, as processes (`wicore up --workers 2`), a real
Redis: prefix-aware placement, the queue's bound and timeouts, and a worker
killed with SIGKILL under load."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from transformers import AutoTokenizer

from wicore.v1 import inference_pb2 as pb
from wicore.v1 import inference_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

from stack import Stack, pid_listening_on, start_stack, until

SETTINGS = {"worker.max_batch_size": 2, "scheduler.max_queue_size": 3}
PREFIX = "Paged attention keeps the KV cache in fixed-size blocks. " * 36


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, redis_url: str) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("routed"), str(tiny_llama_dir), redis_url, 2, SETTINGS)
    yield s
    assert s.stop() == 0, s.log()[-3000:]


@pytest.fixture()
async def client(routed: Stack) -> AsyncIterator[inference_pb2_grpc.InferenceStub]:
    async with grpc.aio.insecure_channel(routed.gateway) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


async def list_workers(stack: Stack) -> scheduler_pb2.ListWorkersResponse:
    async with stack.internal_channel(stack.scheduler) as channel:
        reply: scheduler_pb2.ListWorkersResponse = await scheduler_pb2_grpc.SchedulerStub(
            channel
        ).ListWorkers(scheduler_pb2.ListWorkersRequest())
    return reply


async def dispatched(stack: Stack) -> dict[str, int]:
    return {w.worker_id: w.dispatched for w in (await list_workers(stack)).workers}


def short(prompt: str, salt: str = "", max_tokens: int = 4) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt=prompt, max_tokens=max_tokens, ignore_eos=True, cache_salt=salt, sampling=pb.SamplingParams()
    )


async def started(client: inference_pb2_grpc.InferenceStub, prompt: str, salt: str = "") -> grpc.aio.Call:
    """A long stream that has produced its first token (so it runs on a worker)."""
    call = client.GenerateStream(short(prompt, salt, max_tokens=3000))
    assert (await call.read()).token_ids  # type: ignore[attr-defined]
    return call


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {w: after[w] - before.get(w, 0) for w in after}


async def test_same_prefix_requests_land_on_the_worker_holding_it_unless_it_is_saturated(
    client: inference_pb2_grpc.InferenceStub, routed: Stack, redis_url: str, tiny_llama_dir: Path
) -> None:
    prefix_tokens = len(AutoTokenizer.from_pretrained(tiny_llama_dir).encode(PREFIX))
    assert prefix_tokens > 512  # long enough that recomputing it outweighs a busy slot
    salt = uuid.uuid4().hex
    before = await dispatched(routed)
    first = await client.Generate(short(PREFIX + "first", salt))
    assert first.usage.cached_tokens == 0
    (holder,) = [w for w, n in delta(before, await dispatched(routed)).items() if n == 1]
    (other,) = set(before) - {holder}
    redis = aioredis.from_url(redis_url)
    try:

        async def published() -> bool:
            return await redis.scard(f"{routed.namespace}:res:{holder}") >= prefix_tokens // 16

        await until(published, "the holder never published its prefix blocks to Redis", 5.0)
        assert await redis.scard(f"{routed.namespace}:res:{other}") == 0
    finally:
        await redis.aclose()

    before = await dispatched(routed)
    for i in range(3):
        reply = await client.Generate(short(f"{PREFIX}again {i}", salt))
        assert reply.usage.cached_tokens >= (prefix_tokens // 16 - 1) * 16, i
    assert delta(before, await dispatched(routed)) == {holder: 3, other: 0}

    # Two long streams fill the holder's batch (max_batch_size 2); the next goes to the other.
    longs = [await started(client, f"{PREFIX}long {i}", salt) for i in range(2)]
    try:
        assert delta(before, await dispatched(routed)) == {holder: 5, other: 0}
        reply = await client.Generate(short(f"{PREFIX}third", salt))
        assert reply.usage.cached_tokens == 0
        assert delta(before, await dispatched(routed)) == {holder: 5, other: 1}
    finally:
        for call in longs:
            call.cancel()


async def test_queue_timeout_and_queue_full_get_their_codes(
    client: inference_pb2_grpc.InferenceStub, routed: Stack
) -> None:
    longs = [await started(client, f"filler {i}") for i in range(4)]  # 2 workers x 2 slots: all busy
    queued: list[asyncio.Future[pb.GenerateResponse]] = []
    try:
        before = await dispatched(routed)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.Generate(short("too late"), timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        async def none_queued() -> bool:
            return (await list_workers(routed)).queued == 0

        # The scheduler sees the deadline pass on its side a moment after the client does (on a
        # loaded CI machine the first look found it still queued): it leaves the queue ...
        await until(none_queued, "the timed-out request never left the scheduler's queue", 5.0)
        assert await dispatched(routed) == before  # ... and never reached a worker

        queued = [asyncio.ensure_future(client.Generate(short(f"queued {i}"))) for i in range(3)]

        async def three_queued() -> bool:
            return (await list_workers(routed)).queued == 3

        await until(three_queued, "the requests never showed in the scheduler's queue", 5.0)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.Generate(short("one too many"))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the scheduler's queue is full (3 requests waiting)" in (err.value.details() or "")
    finally:
        for call in longs:
            call.cancel()
    # Once the workers free up, every queued request runs: none is lost.
    replies = await asyncio.wait_for(asyncio.gather(*queued), timeout=30)
    assert [r.usage.completion_tokens for r in replies] == [4, 4, 4]


async def test_invalid_workload_type_and_priority_are_named(client: inference_pb2_grpc.InferenceStub) -> None:
    for request, field in [
        (pb.GenerateRequest(prompt="x", workload_type="poetry"), "workload_type"),
        (pb.GenerateRequest(prompt="x", priority=9), "priority"),  # type: ignore[arg-type]
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.Generate(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith(f"{field}: ")
    reply = await client.Generate(
        pb.GenerateRequest(
            prompt="fine", max_tokens=2, workload_type="simple_qa", priority=pb.PRIORITY_URGENT
        )
    )
    assert reply.usage.completion_tokens == 2


async def consume(call: grpc.aio.Call) -> tuple[str, list[int], str]:
    """(status code name, token ids received, details) of one stream, however it ends."""
    tokens: list[int] = []
    try:
        while (msg := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
            tokens += msg.token_ids
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, tokens, exc.details() or ""
    return "OK", tokens, ""


async def test_killed_worker_under_load_loses_no_request_and_rejoins(
    tmp_path: Path, tiny_llama_dir: Path, redis_url: str
) -> None:
    """kill -9 of a worker with streams running and queued: every stream completes (those that
    had tokens resume on the other worker), greedy output as if nothing happened."""
    stack = await asyncio.to_thread(
        start_stack, tmp_path, str(tiny_llama_dir), redis_url, 2, {"worker.max_batch_size": 2}
    )

    def greedy(i: int) -> pb.GenerateRequest:
        request = short(f"request {i}", max_tokens=300)
        request.sampling.temperature = 0.0
        return request

    try:
        async with grpc.aio.insecure_channel(stack.gateway) as channel:
            client = inference_pb2_grpc.InferenceStub(channel)
            calls = [client.GenerateStream(greedy(i)) for i in range(8)]
            firsts = [await call.read() for call in calls[:2]]  # type: ignore[attr-defined]
            assert all(m.token_ids for m in firsts)
            status = await list_workers(stack)
            victim = next(w for w in status.workers if w.inflight > 0)
            os.kill(pid_listening_on(stack.proc.pid, int(victim.address.rsplit(":", 1)[1])), signal.SIGKILL)
            rest = await asyncio.wait_for(asyncio.gather(*(consume(c) for c in calls)), timeout=90)
            assert [code for code, _, _ in rest] == ["OK"] * 8, rest
            received = [list(m.token_ids) for m in firsts] + [[] for _ in range(6)]
            received = [head + ids for head, (_, ids, _) in zip(received, rest, strict=True)]
            assert [len(ids) for ids in received] == [300] * 8
            assert f"worker {victim.worker_id} dropped" in stack.log()
            assert "resumed on the next worker" in stack.log()

            async def rejoined() -> bool:
                ids = {w.worker_id for w in (await list_workers(stack)).workers}
                return victim.worker_id in ids and len(ids) == 2

            await until(rejoined, "the restarted worker never rejoined", 60.0)
            for i, ids in enumerate(received):  # the same requests, undisturbed
                reply = await client.Generate(greedy(i))
                assert list(reply.token_ids) == ids, f"request {i}"
    finally:
        assert stack.stop() == 0
