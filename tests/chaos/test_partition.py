"""Chaos: a worker cut off from the scheduler, but alive. Its traffic both ways runs
through proxies the test can freeze (a partition: connections stay open, nothing
passes). The scheduler stops hearing its heartbeats, drops it and resumes its streams
on the other worker: every client stream completes, token for token what an
undisturbed run gives, with no text twice. The cut-off worker, hearing nothing from
the scheduler, aborts its orphaned requests; when the link heals it registers again."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from wicore.v1 import inference_pb2 as pb
from wicore.v1 import inference_pb2_grpc

from chaos_util import read_all, worker_status
from stack import Stack, free_port, start_stack, until

STREAMS = 4
TOKENS = 1500  # long enough that the orphans still run when the worker notices


class FreezableProxy:
    """A TCP proxy on 127.0.0.1:`port` to `target`; frozen, it passes nothing and closes nothing."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.flowing.wait()
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                await self.flowing.wait()  # frozen: hold the bytes, keep the connection
                dst.write(data)
                await dst.drain()
        dst.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def greedy(i: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt=f"partition {i}",
        max_tokens=TOKENS,
        ignore_eos=True,
        sampling=pb.SamplingParams(temperature=0.0),
    )


@pytest.mark.slow
async def test_a_worker_cut_off_from_the_scheduler_loses_no_stream(
    tmp_path: Path, tiny_llama_dir: Path, redis_url: str
) -> None:
    stack = await asyncio.to_thread(
        start_stack, tmp_path, str(tiny_llama_dir), redis_url, 1, {"scheduler.routing_policy": "round_robin"}
    )
    scheduler_port = int(stack.scheduler.rsplit(":", 1)[1])
    worker_port = free_port()
    to_worker, to_scheduler = FreezableProxy(worker_port), FreezableProxy(scheduler_port)
    await to_worker.start()
    await to_scheduler.start()
    log_path = tmp_path / "cut-off-worker.log"
    with open(log_path, "wb") as log:
        cut_off = subprocess.Popen(
            [
                sys.executable, "-m", "wicore", "worker", "--config", str(stack.state_dir / "config.yaml"),
                "--port", str(worker_port),
                "--set", f"worker.advertise_address=127.0.0.1:{to_worker.port}",
                "--set", f"scheduler.port={to_scheduler.port}",
            ],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    cut_off_id = f"cpu@127.0.0.1:{to_worker.port}"
    try:
        await until(lambda: _registered(stack, 2), "the second worker to register", 120.0)
        async with grpc.aio.insecure_channel(stack.gateway) as channel:
            client = inference_pb2_grpc.InferenceStub(channel)
            calls = [client.GenerateStream(greedy(i)) for i in range(STREAMS)]
            firsts = [await call.read() for call in calls]  # type: ignore[attr-defined]
            status = {w.worker_id: w for w in await worker_status(stack)}
            assert status[cut_off_id].inflight > 0  # round robin put some streams there
            to_worker.flowing.clear()
            to_scheduler.flowing.clear()
            results = await asyncio.wait_for(asyncio.gather(*(read_all(c) for c in calls)), timeout=120)
            assert [r.code for r in results] == ["OK"] * STREAMS, results
            assert cut_off_id not in {w.worker_id for w in await worker_status(stack)}  # dropped
            await until(
                lambda: "orphaned requests" in log_path.read_text(errors="replace"),
                "the cut-off worker to abort its orphaned requests", 30.0,
            )  # fmt: skip
            to_worker.flowing.set()
            to_scheduler.flowing.set()
            await until(lambda: _registered(stack, 2), "the healed worker to register again", 30.0)
            undisturbed = await asyncio.gather(*(client.Generate(greedy(i)) for i in range(STREAMS)))
            for i, (first, result, reply) in enumerate(zip(firsts, results, undisturbed, strict=True)):
                assert list(first.token_ids) + result.token_ids == list(reply.token_ids), f"stream {i}"
                assert first.text + result.text == reply.text, f"stream {i}: text twice or lost"
    finally:
        cut_off.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            cut_off.wait(timeout=15)
        if cut_off.poll() is None:
            cut_off.kill()
        await to_worker.close()
        await to_scheduler.close()
        assert stack.stop() == 0


async def _registered(stack: Stack, n: int) -> bool:
    return len(await worker_status(stack)) == n
