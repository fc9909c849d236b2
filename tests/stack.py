"""Runs the whole WiCore stack (`wicore up`) as processes, for service tests and benchmarks."""

from __future__ import annotations

import asyncio
import inspect
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from wicore.channels import TOKEN_FILE, InternalAuth, internal_channel
from wicore.config import InternalConfig
from wicore.server import wait_for_serving


async def until(condition: Callable[[], object], what: str, timeout_s: float = 20.0) -> None:
    """Polls `condition` (plain or async) until it is true; fails naming `what` after `timeout_s`.
    For states a service reaches on its own timers (heartbeats, cleanup ticks); bounded."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_PORTS = random.SystemRandom()
PORT_FLOOR = 10000


def free_port(count: int = 1) -> int:
    """The first of `count` consecutive loopback ports that are free now.

    Taken below the kernel's ephemeral range: bind(0) hands out ports from that range, and so
    does every outgoing connection for its local end, so a port found there (or the port after
    it, for worker i on port + i) can be taken by some connection before the service binds it.
    """
    high = _ephemeral_low() - count
    for _ in range(1000):
        base = _PORTS.randrange(PORT_FLOOR, high)
        sockets: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sockets.append(socket.socket())
                sockets[-1].bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports between {PORT_FLOOR} and {high}")


def child_pids(pid: int) -> set[int]:
    """All descendants of pid, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def listens_on(pid: int, port: int) -> bool:
    """Whether process pid holds a listening TCP socket on port (from /proc)."""
    try:
        inodes = {
            os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1]
            for fd in os.listdir(f"/proc/{pid}/fd")
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        }
    except OSError:
        return False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A" and fields[9] in inodes:
                return True
    return False


def pid_listening_on(root: int, port: int) -> int:
    """The descendant of `root` that listens on `port` (a service of a stack)."""
    return next(p for p in child_pids(root) if listens_on(p, port))


@dataclass
class Stack:
    proc: subprocess.Popen[bytes]
    gateway: str
    scheduler: str
    tier: str
    workers: list[str]
    namespace: str
    state_dir: Path
    log_path: Path
    metrics: dict[str, str]  # service (gateway, scheduler, tier, worker-i) -> host:port of its /metrics

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def auth(self) -> InternalAuth:
        """The internal token `wicore up` generated for this run (the scheduler, workers and
        tier refuse calls without it)."""
        return InternalAuth.load(InternalConfig(token_file=str(self.state_dir / TOKEN_FILE)))

    def internal_channel(self, address: str) -> grpc.aio.Channel:
        """A channel to one of this stack's internal services, carrying the token."""
        return internal_channel(address, self.auth)

    def stop(self, timeout_s: float = 20.0, leftovers: bool = False) -> int:
        """SIGTERM to `wicore up`; its exit status. Past `timeout_s`, SIGKILL to its whole process
        tree, then TimeoutExpired. `leftovers`: also SIGKILL what of its tree outlives it."""
        children = child_pids(self.proc.pid) if leftovers else set()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for pid in child_pids(self.proc.pid):
                os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait()
            raise
        for pid in children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        return code


# The settings of the service tests' stacks: fast heartbeats and small pools.
TEST_SETTINGS: dict[str, Any] = {
    "scheduler.heartbeat_interval_s": 0.2,
    "scheduler.worker_timeout_s": 2.0,
    "tier.cpu_capacity_bytes": 64 << 20,
    "worker.max_batch_size": 8,
    "worker.kv_cache_bytes": 64 << 20,
    # The tests' tiny models recompute a block about as fast as it loads, so the measured choice
    # could go either way; the offload tests need the load (test_load_or_recompute.py covers the choice).
    "worker.tier_loads": "always",
    "shutdown_grace_s": 10.0,
}


def start_stack(
    tmp: Path,
    model: str,
    redis_url: str | None,
    workers: int = 1,
    settings: dict[str, Any] | None = None,
    ready_timeout_s: float = 240.0,
    gateway_credentials: grpc.ChannelCredentials | None = None,  # to probe a TLS gateway
) -> Stack:
    """A stack for the service tests: `launch` with TEST_SETTINGS, then `settings`, and Redis at
    `redis_url` (None: as `wicore up` finds it)."""
    redis = {"redis.url": redis_url} if redis_url else {}
    return launch(
        tmp,
        model,
        workers=workers,
        settings=TEST_SETTINGS | redis | (settings or {}),
        ready_timeout_s=ready_timeout_s,
        gateway_credentials=gateway_credentials,
    )


READY_LINE = "wicore: serving "  # what `wicore up` prints once every child answered its probe


def launch(
    tmp: Path,
    model: str | Path,
    *,
    workers: int = 1,
    settings: dict[str, Any] | None = None,
    state_dir: Path | None = None,
    ready_timeout_s: float = 240.0,
    gateway_credentials: grpc.ChannelCredentials | None = None,
) -> Stack:
    """`wicore up --workers N` serving `model`, its config in tmp/wicore.yaml, its output in tmp/up.log:
    each service on a free port, the gateway's HTTP off, a fresh Redis namespace, Redis as `wicore up`
    finds it, the state in `state_dir` (default tmp/state); dotted `settings` ("worker.kv_cache_bytes",
    "shutdown_grace_s") win. Returns once the gateway serves and the scheduler knows every worker; past
    `ready_timeout_s`, or if `up` exits, stops it and raises RuntimeError with the end of its log."""
    base = free_port(2 * (3 + workers))  # one run of ports: none can be handed out twice
    metrics_base = base + 3 + workers  # the second half: gateway, scheduler, tier, workers (wicore.launcher)
    if (settings or {}).get("observability.metrics_port") == 0:
        metrics_base = 0  # asked for no /metrics at all
    defaults: dict[str, Any] = {
        "gateway.port": base,
        "gateway.http_port": 0,  # HTTP on: settings={"gateway.http_port": ...}
        "scheduler.port": base + 1,
        "tier.port": base + 2,
        "worker.port": base + 3,  # worker i on this port + i
        "worker.model": str(model),
        "redis.namespace": f"wicore-test-{uuid.uuid4().hex[:8]}",
        "state_dir": str(state_dir or tmp / "state"),
    }
    config: dict[str, Any] = {}
    for dotted, value in (defaults | (settings or {})).items():
        section, _, key = dotted.rpartition(".")
        (config.setdefault(section, {}) if section else config)[key] = value
    cfg = tmp / "wicore.yaml"
    cfg.write_text(yaml.safe_dump(config))
    log_path = tmp / "up.log"
    up = [sys.executable, "-m", "wicore", "up", "--config", str(cfg), "--workers", str(workers)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*up, "--set", f"observability.metrics_port={metrics_base}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    stack = Stack(
        proc=proc,
        gateway=f"127.0.0.1:{config['gateway']['port']}",
        scheduler=f"127.0.0.1:{config['scheduler']['port']}",
        tier=f"127.0.0.1:{config['tier']['port']}",
        workers=[f"127.0.0.1:{config['worker']['port'] + i}" for i in range(workers)],
        namespace=config["redis"]["namespace"],
        state_dir=Path(config["state_dir"]),
        log_path=log_path,
        metrics={
            name: f"127.0.0.1:{metrics_base + i}"
            for i, name in enumerate(
                ["gateway", "scheduler", "tier", *(f"worker-{i}" for i in range(workers))]
            )
            if metrics_base
        },
    )
    deadline = time.monotonic() + ready_timeout_s
    try:
        while not asyncio.run(wait_for_serving(stack.gateway, 1.0, credentials=gateway_credentials)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"wicore up did not become ready:\n{stack.log()[-4000:]}")
        # The gateway is the last to start; its SERVING means everything is up, but
        # the worker registers asynchronously: wait until the scheduler knows it.
        _wait_registered(stack, workers, deadline)
        # And until `wicore up` itself has seen the gateway ready (it polls on its own): a
        # child killed before that is a failed start to it, not a crash to restart.
        while READY_LINE not in stack.log():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"wicore up did not say it serves:\n{stack.log()[-4000:]}")
            time.sleep(0.05)
    except BaseException:
        stack.stop()  # never leave processes behind, whatever went wrong
        raise
    return stack


def _wait_registered(stack: Stack, workers: int, deadline: float) -> None:
    from wicore.v1 import scheduler_pb2, scheduler_pb2_grpc

    with grpc.insecure_channel(stack.scheduler) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        request = scheduler_pb2.ListWorkersRequest()
        while len(stub.ListWorkers(request, metadata=stack.auth.metadata).workers) < workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers did not register:\n{stack.log()[-4000:]}")
            time.sleep(0.05)
