"""Worker failure, seen by a real scheduler over real gRPC on loopback, with
scripted workers (no model) that die or hang at chosen moments."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from wicore.config import load_config
from wicore.scheduler.app import build_servicer
from wicore.server import ServiceServer
from wicore.v1 import inference_pb2 as pb
from wicore.v1 import scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc

from stack import free_port


class ScriptedWorker(worker_pb2_grpc.WorkerServicer):
    """`ok`: 3 tokens; `die_first`: UNAVAILABLE before any token; `die_after`: after one;
    `hang`: never answers (a stuck process). A resumed request continues up to token 3."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.calls = 0
        self.resumed: list[list[int]] = []

    async def _resume(
        self, request: worker_pb2.TokenizedRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        self.resumed.append(list(request.generated_token_ids))
        rid = request.request.request_id
        for token in range(len(request.generated_token_ids) + 1, 4):
            yield pb.GenerateStreamResponse(request_id=rid, token_ids=[token], text="x")
            if self.mode == "die_after":
                await context.abort(grpc.StatusCode.UNAVAILABLE, "scripted crash")
        yield pb.GenerateStreamResponse(request_id=rid, finish_reason=pb.FINISH_REASON_LENGTH)

    async def Generate(
        self, tokenized: worker_pb2.TokenizedRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        if tokenized.generated_token_ids:
            async for msg in self._resume(tokenized, context):
                yield msg
            return
        request = tokenized.request
        self.calls += 1
        if self.mode == "die_first":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "scripted crash")
        if self.mode == "hang":
            await asyncio.Event().wait()
        yield pb.GenerateStreamResponse(request_id=request.request_id, token_ids=[1], text="a")
        if self.mode == "die_after":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "scripted crash")
        yield pb.GenerateStreamResponse(request_id=request.request_id, token_ids=[2, 3], text="bc")
        yield pb.GenerateStreamResponse(request_id=request.request_id, finish_reason=pb.FINISH_REASON_LENGTH)


class Scene:
    def __init__(self, tmp: Path, redis_url: str, modes: dict[str, str]) -> None:
        port = free_port()
        self.config = load_config(
            None,
            {},
            {
                "scheduler.port": port,
                "scheduler.heartbeat_interval_s": 0.1,
                "scheduler.worker_timeout_s": 0.5,
                "redis.url": redis_url,
                "state_dir": str(tmp),
            },
        )
        self.address = f"127.0.0.1:{port}"
        self.modes = modes
        self.workers = {wid: ScriptedWorker(mode) for wid, mode in modes.items()}
        self.servers: list[ServiceServer] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Scene:
        self.servicer = build_servicer(self.config)
        sched = ServiceServer("scheduler", "127.0.0.1", self.config.scheduler.port)
        sched.add(scheduler_pb2_grpc.add_SchedulerServicer_to_server, self.servicer, "wicore.v1.Scheduler")
        await sched.start()
        self.servers.append(sched)
        self.tasks.append(asyncio.create_task(self.servicer.expire_loop()))
        self.channel = grpc.aio.insecure_channel(self.address)
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)
        for wid, worker in self.workers.items():
            port = free_port()
            server = ServiceServer(wid, "127.0.0.1", port)
            server.add(worker_pb2_grpc.add_WorkerServicer_to_server, worker, "wicore.v1.Worker")
            await server.start()
            self.servers.append(server)
            register = scheduler_pb2.RegisterWorkerRequest(
                worker_id=wid, address=f"127.0.0.1:{port}", device="cpu", model="m", max_context=512,
                total_blocks=100, block_size=16, max_batch_size=4,
            )  # fmt: skip
            await self.stub.RegisterWorker(register)
            if self.modes[wid] != "hang":  # a hung process sends no heartbeats either
                self.tasks.append(asyncio.create_task(self._beat(wid)))
        return self

    async def _beat(self, wid: str) -> None:
        while True:
            await self.stub.Heartbeat(scheduler_pb2.HeartbeatRequest(worker_id=wid))
            await asyncio.sleep(0.05)

    async def __aexit__(self, *exc: object) -> None:
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await task
        await self.channel.close()
        for server in self.servers:
            await server.server.stop(0)
        await self.servicer.channels.close_all()
        await self.servicer.prefixes.close()

    async def generate(self) -> list[int]:
        ids: list[int] = []
        request = worker_pb2.TokenizedRequest(
            request=pb.GenerateRequest(max_tokens=3), prompt_token_ids=[5, 6]
        )
        async for msg in self.stub.Generate(request, timeout=10):
            ids += msg.token_ids
        return ids

    async def live(self) -> list[str]:
        reply = await self.stub.ListWorkers(scheduler_pb2.ListWorkersRequest())
        return sorted(w.worker_id for w in reply.workers)


async def test_a_request_whose_worker_dies_before_a_token_runs_on_another(
    tmp_path: Path, redis_url: str
) -> None:
    # Equal workers tie; "a" goes first by id, dies, and is dropped at once.
    async with Scene(tmp_path, redis_url, {"a": "die_first", "b": "ok"}) as scene:
        assert await scene.generate() == [1, 2, 3]
        assert [scene.workers["a"].calls, scene.workers["b"].calls] == [1, 1]
        assert await scene.live() == ["b"]


async def test_a_stream_that_had_tokens_resumes_on_another_worker(tmp_path: Path, redis_url: str) -> None:
    async with Scene(tmp_path, redis_url, {"a": "die_after", "b": "ok"}) as scene:
        assert await scene.generate() == [1, 2, 3]  # 1 from a, then 2 and 3 from b
        assert scene.workers["b"].calls == 0 and scene.workers["b"].resumed == [[1]]
        assert await scene.live() == ["b"]


async def test_a_stream_failing_on_every_worker_ends_in_unavailable(tmp_path: Path, redis_url: str) -> None:
    async with Scene(tmp_path, redis_url, {"a": "die_after", "b": "die_after"}) as scene:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(scene.generate(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert scene.workers["b"].resumed == [[1]] or scene.workers["a"].resumed == [[1]]


async def test_a_hung_worker_is_dropped_and_its_request_rerouted(tmp_path: Path, redis_url: str) -> None:
    async with Scene(tmp_path, redis_url, {"a": "hang", "b": "ok"}) as scene:
        # "a" never answers and stops heartbeating: after worker_timeout_s it is dropped,
        # its call cancelled, and the request (no token yet) placed on "b".
        assert await asyncio.wait_for(scene.generate(), timeout=5) == [1, 2, 3]
        assert scene.workers["a"].calls == 1 and await scene.live() == ["b"]


async def test_every_worker_failing_ends_in_unavailable(tmp_path: Path, redis_url: str) -> None:
    async with Scene(tmp_path, redis_url, {"a": "die_first", "b": "die_first"}) as scene:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(scene.generate(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await scene.live() == []
