"""`wicore up`: every service as its own process on this machine.

    redis (configured, or private)  ─┐
    tier :50053                      │  started in this order, each waited on
    scheduler :50052                 │  until grpc.health says SERVING
    worker :50060 (+i for worker i)  │  devices cycle over --device; "auto": each GPU, plus a CPU worker
                                     │  CPU workers split the cores (worker.num_threads) when several
    gateway :50051 (public)         ─┘  stopped in the reverse order

Each service serves Prometheus `/metrics` on its own port, from
`observability.metrics_port` (default 9400) on: gateway, scheduler, tier, then the
workers in order (9400, 9401, 9402, 9403, ...); the launcher prints the addresses once
everything serves. `observability.metrics_port: 0` turns every endpoint off.

Children get the resolved config as a file in the state directory (mode 0600),
with the internal token (wicore.channels) in `internal-token` beside it, freshly
generated unless one is configured. A TLS gateway is probed on its health-only
Unix socket (no client certificate needed). A child that does not become ready
is started again (START_ATTEMPTS in all, with backoff), and the launcher says
what it printed last; one that dies later is restarted (at most
RESTARTS_PER_MINUTE times a minute; a worker registers again by itself); past
that, all are stopped. Ctrl-C or SIGTERM stops the children in the reverse order,
a kind at a time, each given STOP_TIMEOUT_S (SIGTERM, then SIGKILL; see `_stop`);
children also get SIGTERM if this process dies abruptly (they ask for it themselves:
see `spawn`).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

import yaml

from wicore.channels import (
    gateway_probe_address,
    gateway_server_credentials,
    with_internal_token,
    write_private,
)
from wicore.child import PARENT_PID_ENV
from wicore.cli import SERVICES
from wicore.config import Config, RedisConfig, redacted_url, to_dict
from wicore.errors import ConfigError
from wicore.model_files import resolve_model
from wicore.redis_server import redis_answers, start_private_redis
from wicore.server import wait_for_serving

STOP_TIMEOUT_S = 12.0
READY_TIMEOUT_S = 300.0
RESTARTS_PER_MINUTE = 3
START_ATTEMPTS = 3
START_BACKOFF_S = 1.0  # doubles after each failed start
OUTPUT_TAIL_LINES = 20


class OutputTail:
    """Relays a child's output (stdout and stderr, merged) to ours, line by line,
    keeping the last lines to say why the child failed."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL_LINES)
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[bytes]) -> None:
        with stream:
            for raw in stream:
                line = raw.decode(errors="replace")
                self.lines.append(line.rstrip("\n"))
                sys.stderr.write(line)
                sys.stderr.flush()

    def text(self) -> str:
        self._thread.join(timeout=1.0)  # the child has exited or been killed: let the pipe drain
        return "\n".join(self.lines)


def spawn(argv: list[str]) -> tuple[subprocess.Popen[bytes], OutputTail]:
    """Starts a child in its own process group (Ctrl-C reaches `up` only; it stops the
    children in order), with no preexec_fn so that it is vforked (see `wicore.child`).

    Not in a session of its own: Linux schedules each session as one group (autogroup), so that a
    service in a session of its own took CPU from any other session's process as if it were one of
    equal rank, `nice` regardless. Measured (two cores, SmolLM2, 16 x 128 -> 64 through the stack,
    a busy loop at nice 19 started beside `up`): 17 tok/s with the services in sessions of their
    own, 271 in `up`'s, against 282 with nothing beside it."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        process_group=0,
        env={**os.environ, PARENT_PID_ENV: str(os.getpid())},
    )
    assert proc.stdout is not None
    return proc, OutputTail(proc.stdout)


@dataclass(slots=True)
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    address: str | None  # gRPC address to health-check; None for Redis
    args: list[str] = field(default_factory=list)  # how to start it again
    restarts: list[float] = field(default_factory=list)  # when it was restarted
    output: OutputTail | None = None

    @classmethod
    def launch(cls, name: str, args: list[str], address: str) -> Child:
        """Starts the service args[0] with the flags after it as a child: `python -m wicore.NAME ...`."""
        proc, output = spawn(_service_argv(args))
        return cls(name, proc, address, args, output=output)

    def start(self) -> None:
        """Starts it again, with the same arguments."""
        self.proc, self.output = spawn(_service_argv(self.args))

    def last_output(self) -> str:
        return self.output.text() if self.output is not None else ""

    def may_restart(self, now: float) -> bool:
        """At most RESTARTS_PER_MINUTE restarts in any minute; Redis is never restarted."""
        self.restarts = [t for t in self.restarts if now - t < 60]
        return bool(self.args) and len(self.restarts) < RESTARTS_PER_MINUTE


def _service_argv(args: list[str]) -> list[str]:
    """The service's own entry point, in the child itself (no `wicore` CLI hop)."""
    service, *flags = args
    return [sys.executable, "-m", SERVICES[service], *flags]


def _say(message: str) -> None:
    print(f"wicore: {message}", file=sys.stderr, flush=True)


def _stop(children: list[Child]) -> None:
    """Stops the children in the reverse of their start order, one kind at a time: the gateway
    first (it drains its streams while everything behind it still serves them), then the workers
    together (each deregisters from a scheduler that still answers), the scheduler, the tier and
    Redis. Each stage gets SIGTERM and STOP_TIMEOUT_S to exit, then SIGKILL."""
    for stage in _stages(children[::-1]):
        live = [child for child in stage if child.proc.poll() is None]
        for child in live:
            child.proc.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child in live:
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _say(f"{child.name} did not stop in time; killing it")
                child.proc.kill()
                child.proc.wait()


def _stages(children: list[Child]) -> list[list[Child]]:
    """Consecutive children of one kind (`worker-0`, `worker-1`, ...: `worker`) as one stage."""
    return [list(stage) for _, stage in itertools.groupby(children, key=lambda c: c.name.split("-")[0])]


METRICS_ORDER = ("gateway", "scheduler", "tier")  # then worker-0, worker-1, ...


def metrics_ports(base: int, workers: int) -> dict[str, int]:
    """Each child's /metrics port: `base` for the gateway, then one each in METRICS_ORDER and
    worker order; none when `base` is 0 (metrics off)."""
    if not base:
        return {}
    names = [*METRICS_ORDER, *(f"worker-{i}" for i in range(workers))]
    if base + len(names) - 1 > 65535:
        raise ConfigError(f"observability.metrics_port: {base} leaves no room for {len(names)} ports")
    return {name: base + i for i, name in enumerate(names)}


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_list(spec: str, gpu_count: int) -> list[str]:
    """`cpu,gpu:0,...` as given; `auto`: every GPU and one CPU worker beside them, or CPU alone."""
    if spec.strip() == "auto":
        return [f"gpu:{i}" for i in range(gpu_count)] + ["cpu"]
    return [d.strip() for d in spec.split(",") if d.strip()]


def plan_workers(devices: list[str], workers: int, cpus: int, num_threads: int) -> list[tuple[str, int]]:
    """(device, torch threads) per worker: devices taken in turn; several CPU workers share
    the cores evenly (at least one thread each) unless worker.num_threads is set."""
    chosen = [devices[i % len(devices)] for i in range(workers)]
    on_cpu = chosen.count("cpu")
    threads = num_threads or (max(1, cpus // on_cpu) if on_cpu > 1 else 0)
    return [(d, threads if d == "cpu" else num_threads) for d in chosen]


def device_spec(config: Config, devices: str | None) -> str:
    """`--device`; without it worker.device unless that is the default `cpu`, else the
    performance guide's gpu_config.target_devices (default: cpu too)."""
    if devices:
        return devices
    if config.worker.device != "cpu":
        return config.worker.device
    return ",".join(config.gpu_config.target_devices)


def prepare(config: Config, devices: str | None) -> tuple[Config, list[str]]:
    """Resolves the model (converting the default once) and the device list."""
    source = resolve_model(config.worker.model, config.cache_path, config.worker.model_id)
    worker = dataclasses.replace(config.worker, model=str(source.path), model_id=source.model_id)
    spec = device_spec(config, devices)
    gpus = _gpu_count() if spec.strip() == "auto" else 0
    return dataclasses.replace(config, worker=worker), device_list(spec, gpus)


def run_up(config: Config, workers: int = 1, devices: str | None = None) -> int:
    if workers < 1:
        _say("--workers must be at least 1")
        return 2
    state = config.state_path
    state.mkdir(parents=True, exist_ok=True)
    children: list[Child] = []
    stop_requested = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        gateway_server_credentials(config.gateway)  # bad TLS settings fail here, not in a child
        config = with_internal_token(config, state)
        config, device_names = prepare(config, devices)
        if not redis_answers(config.redis):
            _say(f"no Redis answers at {redacted_url(config.redis.url)}; starting a private one in {state}")
            proc, url = start_private_redis(state)
            children.append(Child("redis", proc, None))
            # The private server: a plain socket, no credentials, no TLS, no cluster.
            private = RedisConfig(url=url, namespace=config.redis.namespace)
            config = dataclasses.replace(config, redis=private)
        config_path = state / "config.yaml"
        write_private(config_path, yaml.safe_dump(to_dict(config), sort_keys=False))
        base = ["--config", str(config_path)]
        ports = metrics_ports(config.observability.metrics_port, workers)
        plan: list[tuple[str, list[str], str]] = [
            ("tier", ["tier", *base], f"{config.tier.host}:{config.tier.port}"),
            ("scheduler", ["scheduler", *base], f"{config.scheduler.host}:{config.scheduler.port}"),
        ]
        cpus = len(os.sched_getaffinity(0))
        assigned = plan_workers(device_names, workers, cpus, config.worker.num_threads)
        for i, (device, threads) in enumerate(assigned):
            port = config.worker.port + i
            args = ["worker", *base, "--port", str(port), "--device", device]
            if threads:
                args += ["--set", f"worker.num_threads={threads}"]
            plan.append((f"worker-{i}", args, f"{config.worker.host}:{port}"))
        plan.append(("gateway", ["gateway", *base], gateway_probe_address(config)))
        for name, args, address in plan:
            if stop_requested:
                break
            metrics = ["--set", f"observability.metrics_port={ports.get(name, 0)}"]
            children.append(Child.launch(name, [*args, *metrics], address))
            if not _until_ready(children[-1], lambda: stop_requested) and not stop_requested:
                _say(f"{name} did not become ready after {START_ATTEMPTS} attempts; stopping everything")
                return 1
        if stop_requested:
            return 0
        _say(
            f"serving {config.worker.model_id} on {config.gateway.host}:{config.gateway.port} "
            f"({workers} worker{'s' if workers > 1 else ''}); Ctrl-C stops"
        )
        if ports:
            host = config.observability.metrics_host
            _say(
                "metrics: "
                + ", ".join(f"{name} http://{host}:{port}/metrics" for name, port in ports.items())
            )
        while not stop_requested:
            for child in children:
                if child.proc.poll() is None:
                    continue
                if not child.may_restart(time.monotonic()):
                    _say(f"{child.name} exited with {child.proc.returncode}; stopping everything")
                    return 1
                _say(f"{child.name} exited with {child.proc.returncode}; restarting it")
                child.restarts.append(time.monotonic())
                child.start()
            time.sleep(0.2)
        return 0
    finally:
        if children:
            _say("stopping...")
        _stop(children)


def _until_ready(child: Child, stopping: Callable[[], bool]) -> bool:
    """Waits for a started child to answer SERVING; a child that exits or stays silent for
    READY_TIMEOUT_S is shown (what it printed last) and started again, START_ATTEMPTS
    times in all with doubling backoff."""
    for attempt in range(1, START_ATTEMPTS + 1):
        if attempt > 1:
            child.start()
        if _wait_ready(child, stopping):
            return True
        if stopping():
            return False
        code = child.proc.poll()
        if code is None:
            child.proc.kill()
            child.proc.wait()
            why = f"no answer in {READY_TIMEOUT_S:.0f} s; killed"
        else:
            why = f"exited with {code}"
        _say(f"{child.name} did not become ready (attempt {attempt} of {START_ATTEMPTS}: {why}); it printed:")
        print(textwrap.indent(child.last_output() or "(nothing)", "    | "), file=sys.stderr, flush=True)
        if attempt < START_ATTEMPTS:
            time.sleep(START_BACKOFF_S * 2 ** (attempt - 1))
    return False


def _wait_ready(child: Child, stopping: Callable[[], bool]) -> bool:
    assert child.address is not None
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if child.proc.poll() is not None or stopping():
            return False
        if asyncio.run(wait_for_serving(child.address, timeout_s=1.0)):
            return True
    return False
