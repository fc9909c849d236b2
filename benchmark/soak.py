"""Soak: thousands of mixed requests through a whole stack, watching every service process.

    python benchmark/soak.py --requests 2000 --concurrency 8 --json soak.json
        [--model DIR] [--redis-url URL] [--warmup N] [--interval 0.5] [--set section.key=value ...]

Starts a stack as the service tests do (`tests/stack.py`: `wicore up` with a gateway, a
scheduler, one worker and the tier), on the tiny random Llama of `tests/tiny_models.py`
unless `--model` names a model directory, and Redis at `--redis-url` (default: the local
one if it answers, else a private redis-server). Then `--concurrency` clients send
`--requests` requests in all, drawn (seeded) from a mix:

    generate   Generate, prompts of 1 to ~300 words, max_tokens 1-64, greedy or sampled
    stream     GenerateStream, read to the end
    chat       ChatStream, one to three turns, read to the end
    cancel     GenerateStream of 500 tokens, cancelled after 1-3 messages
    invalid    a bad field (top_p 1.5, temperature -1, logprobs 99, empty prompt): INVALID_ARGUMENT

Every `--interval` seconds it samples each service's resident memory (VmRSS), open file
descriptors (/proc/PID/fd) and threads (/proc/PID/status). The warm-up value is the
sample taken when `--warmup` requests have completed; the end value is taken after the
last request, once the worker's heartbeats show it idle. The table shows, per service and
measure, the warm-up value, the end value, the maximum after warm-up and the growth after
warm-up (end minus warm-up); `--json` writes it all, with every sample. A request with an outcome its
kind does not expect (an error for the valid kinds, anything but INVALID_ARGUMENT for the
invalid one), a service whose process changed (restarted), or anything still held on the
worker at the end (in flight, reserved, running or KV blocks not free) makes the exit
status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import parse_settings, sample_process, service_pids

from wicore.v1 import inference_pb2 as pb
from wicore.v1 import inference_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, tier_pb2, tier_pb2_grpc

from stack import Stack, start_stack

KINDS = {"generate": 0.35, "stream": 0.25, "chat": 0.2, "cancel": 0.1, "invalid": 0.1}
_WORD_TEXT = (
    "the of and to in is that for it as was with be by on not this are or from at which but have an they "
    "memory cache block attention model server worker gateway scheduler tier token stream request"
)
WORDS = tuple(_WORD_TEXT.split())
MEASURES = ("rss_kib", "fds", "threads")


# --- what each client sends -----------------------------------------------------------------


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def options(rng: random.Random) -> pb.GenerateRequest:
    """max_tokens and sampling of a valid request (prompt left empty)."""
    request = pb.GenerateRequest(max_tokens=rng.randint(1, 64))
    if rng.random() < 0.5:
        request.sampling.temperature = 0.0
    else:
        request.sampling.temperature, request.sampling.seed = 0.8, rng.randrange(1 << 30)
    return request


def invalid(rng: random.Random) -> pb.GenerateRequest:
    request = pb.GenerateRequest(prompt=words(rng, 5), max_tokens=8)
    choice = rng.randrange(4)
    if choice == 0:
        request.sampling.top_p = 1.5
    elif choice == 1:
        request.sampling.temperature = -1.0
    elif choice == 2:
        request.logprobs = 99
    else:
        request.prompt = ""
    return request


async def drain(call: grpc.aio.UnaryStreamCall) -> int:
    """Reads a stream to its end; the messages it carried."""
    messages = 0
    async for _ in call:
        messages += 1
    return messages


async def send(client: inference_pb2_grpc.InferenceStub, kind: str, rng: random.Random) -> str:
    """One request of `kind`; its outcome: "ok", "cancelled" or a status code's name."""
    timeout = 120.0
    try:
        if kind == "generate":
            request = options(rng)
            request.prompt = words(rng, rng.choice((1, 8, 40, 300)))
            reply = await client.Generate(request, timeout=timeout)
            return "ok" if 1 <= reply.usage.completion_tokens <= request.max_tokens else "bad_usage"
        if kind == "stream":
            request = options(rng)
            request.prompt = words(rng, rng.choice((3, 30, 120)))
            return "ok" if await drain(client.GenerateStream(request, timeout=timeout)) else "empty"
        if kind == "chat":
            turns = [pb.ChatMessage(role="user", content=words(rng, rng.randint(2, 40)))]
            if rng.random() < 0.5:
                turns += [pb.ChatMessage(role="assistant", content=words(rng, 10)), turns[0]]
            chat = pb.ChatRequest(messages=turns, options=options(rng))
            return "ok" if await drain(client.ChatStream(chat, timeout=timeout)) else "empty"
        if kind == "cancel":
            request = pb.GenerateRequest(prompt=words(rng, 20), max_tokens=500, ignore_eos=True)
            call = client.GenerateStream(request, timeout=timeout)
            for _ in range(rng.randint(1, 3)):
                await call.read()
            call.cancel()
            return "cancelled"
        await client.Generate(invalid(rng), timeout=timeout)
        return "ok"
    except grpc.aio.AioRpcError as exc:
        return str(exc.code().name)


EXPECTED = {"generate": {"ok"}, "stream": {"ok"}, "chat": {"ok"}, "cancel": {"cancelled"},
            "invalid": {"INVALID_ARGUMENT"}}  # fmt: skip


# --- watching the processes -------------------------------------------------------------------


def sample(pid: int) -> dict[str, int]:
    """VmRSS (KiB), open descriptors and threads of a process; empty if it is gone."""
    found = sample_process(pid)
    if found is None:
        return {}
    return {"rss_kib": found.rss_bytes // 1024, "fds": found.open_fds, "threads": found.threads}


@dataclass
class Series:
    """One measure of one service: at the warm-up sample, at the end, and its maximum from the
    warm-up sample on (start-up is not the soak's business)."""

    warmup: int
    end: int
    max: int

    @property
    def growth(self) -> int:
        return self.end - self.warmup


@dataclass
class Report:
    params: dict[str, Any]
    outcomes: dict[str, dict[str, int]]  # kind -> outcome -> count
    latency_ms: dict[str, dict[str, float]]  # kind -> p50, p99
    services: dict[str, dict[str, Series]]  # service -> measure -> series
    unexpected: int
    restarted: list[str]
    idle_at_end: bool
    wall_s: float
    tier_blocks: dict[str, dict[str, int]]  # "warmup" / "end" -> level ("cpu", "nvme") -> blocks held
    samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unexpected and not self.restarted and self.idle_at_end

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for name, measures in self.services.items():
            for measure, series in measures.items():
                data["services"][name][measure]["growth"] = series.growth
        data["ok"] = self.ok
        return data


class Sampler:
    """Samples every service every `interval_s` until stopped; marks the warm-up sample."""

    def __init__(self, pids: dict[str, int], interval_s: float) -> None:
        self.pids = pids
        self.interval_s = interval_s
        self.samples: list[dict[str, Any]] = []
        self.warmup_index: int | None = None
        self.started = time.monotonic()

    def take(self) -> dict[str, Any]:
        row: dict[str, Any] = {"t": round(time.monotonic() - self.started, 3)}
        row |= {name: sample(pid) for name, pid in self.pids.items()}
        self.samples.append(row)
        return row

    def mark_warmup(self) -> None:
        self.take()
        self.warmup_index = len(self.samples) - 1

    async def run(self) -> None:
        while True:
            self.take()
            await asyncio.sleep(self.interval_s)

    def gone(self) -> list[str]:
        return sorted({name for row in self.samples for name in self.pids if not row[name]})

    def series(self) -> dict[str, dict[str, Series]]:
        after = self.samples[self.warmup_index or 0 :]
        return {
            name: {m: Series(after[0][name].get(m, 0), after[-1][name].get(m, 0),
                             max(r[name].get(m, 0) for r in after)) for m in MEASURES}
            for name in self.pids
        }  # fmt: skip


# --- the run --------------------------------------------------------------------------------------


async def idle(stack: Stack, since: float, timeout_s: float = 30.0) -> bool:
    """Whether the workers' heartbeats (sent after `since`) and the scheduler show nothing held."""
    deadline = time.monotonic() + timeout_s
    async with stack.internal_channel(stack.scheduler) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        while time.monotonic() < deadline:
            reply = await stub.ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=10)
            now = time.monotonic()
            if reply.workers and all(
                now - w.seconds_since_heartbeat > since + 0.5 and w.inflight == 0 and w.reserved_blocks == 0
                and w.load.running == 0 and w.load.waiting == 0 and w.load.free_blocks == w.total_blocks
                for w in reply.workers
            ):  # fmt: skip
                return True
            await asyncio.sleep(0.2)
    return False


async def tier_blocks(stack: Stack) -> dict[str, int]:
    """The blocks the tier holds, per level: its memory follows them (one index entry each)."""
    async with stack.internal_channel(stack.tier) as channel:
        stats = await tier_pb2_grpc.TierStub(channel).Stats(tier_pb2.StatsRequest(), timeout=10)
    return {
        tier_pb2.StorageTier.Name(t.tier).removeprefix("STORAGE_TIER_").lower(): t.blocks for t in stats.tiers
    }


async def soak(
    stack: Stack, requests: int, concurrency: int, warmup: int, interval_s: float = 0.5, seed: int = 0
) -> Report:
    """Runs the mix through `stack` (see the module docstring) and reports."""
    rng = random.Random(seed)
    kinds = rng.choices(list(KINDS), weights=list(KINDS.values()), k=requests)
    outcomes: dict[str, Counter[str]] = {k: Counter() for k in KINDS}
    latencies: dict[str, list[float]] = {k: [] for k in KINDS}
    sampler = Sampler(service_pids(stack), interval_s)
    sampling = asyncio.create_task(sampler.run())
    next_index = 0
    done = 0
    started = time.monotonic()
    blocks: dict[str, dict[str, int]] = {}

    async def client(worker: int) -> None:
        nonlocal next_index, done
        my_rng = random.Random(seed * 1000 + worker)
        async with grpc.aio.insecure_channel(stack.gateway) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            while next_index < requests:
                kind = kinds[next_index]
                next_index += 1
                began = time.monotonic()
                outcomes[kind][await send(stub, kind, my_rng)] += 1
                latencies[kind].append(time.monotonic() - began)
                done += 1
                if done == warmup:
                    sampler.mark_warmup()
                    blocks["warmup"] = await tier_blocks(stack)

    try:
        await asyncio.gather(*(client(i) for i in range(concurrency)))
        wall_s = time.monotonic() - started
        settled = await idle(stack, time.monotonic())
        sampler.take()  # the end value
        blocks["end"] = await tier_blocks(stack)
    finally:
        sampling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampling
    if sampler.warmup_index is None:
        sampler.warmup_index = 0
    unexpected = sum(n for k, c in outcomes.items() for o, n in c.items() if o not in EXPECTED[k])
    return Report(
        params=dict(
            requests=requests, concurrency=concurrency, warmup=warmup, interval_s=interval_s, seed=seed
        ),
        outcomes={k: dict(c) for k, c in outcomes.items()},
        latency_ms={k: _percentiles(v) for k, v in latencies.items() if v},
        services=sampler.series(),
        unexpected=unexpected,
        restarted=sorted(set(sampler.gone()) | _restarted(stack, sampler.pids)),
        idle_at_end=settled,
        wall_s=round(wall_s, 2),
        tier_blocks=blocks,
        samples=sampler.samples,
    )


def _restarted(stack: Stack, pids: dict[str, int]) -> set[str]:
    now = service_pids(stack)
    return {name for name, pid in pids.items() if now.get(name) != pid}


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50": round(1000 * statistics.median(ordered), 1), "p99": round(1000 * p99, 1)}


def table(report: Report) -> str:
    """The report as text: outcomes per kind, then each service's measures."""
    lines = [f"{report.params['requests']} requests, {report.params['concurrency']} at once, "
             f"in {report.wall_s:.1f} s ({report.params['requests'] / report.wall_s:.1f} req/s)", "",
             f"{'kind':<10}{'outcomes':<44}{'p50 ms':>9}{'p99 ms':>9}"]  # fmt: skip
    for kind, counts in report.outcomes.items():
        text = ", ".join(f"{o} {n}" for o, n in sorted(counts.items()))
        lat = report.latency_ms.get(kind, {})
        lines.append(f"{kind:<10}{text:<44}{lat.get('p50', 0):>9.1f}{lat.get('p99', 0):>9.1f}")
    lines += ["", f"{'service':<11}{'measure':<12}{'warm-up':>10}{'end':>10}{'max':>10}{'growth':>10}"]
    for name, measures in report.services.items():
        for measure, s in measures.items():
            unit = (lambda v: f"{v / 1024:.1f}M") if measure == "rss_kib" else str
            label = "rss" if measure == "rss_kib" else measure
            lines.append(f"{name:<11}{label:<12}{unit(s.warmup):>10}{unit(s.end):>10}{unit(s.max):>10}"
                         f"{unit(s.growth):>10}")  # fmt: skip
    held = "; ".join(f"{when}: " + ", ".join(f"{n} {level}" for level, n in levels.items())
                     for when, levels in report.tier_blocks.items())  # fmt: skip
    lines += ["", f"tier blocks held: {held}"]
    lines += ["", f"unexpected outcomes: {report.unexpected}; restarted: {report.restarted or 'none'}; "
                  f"idle at the end: {report.idle_at_end}"]  # fmt: skip
    return "\n".join(lines)


# --- the command line -----------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=0, help="requests before the warm-up sample "
                        "(default: a tenth, at least 50)")  # fmt: skip
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="a model directory (default: a tiny random Llama)")
    parser.add_argument("--redis-url")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--json", type=Path, help="write the report (with every sample) here")
    args = parser.parse_args()
    warmup = args.warmup or max(50, args.requests // 10)
    with tempfile.TemporaryDirectory(prefix="wicore-soak-") as tmp_dir:
        tmp = Path(tmp_dir)
        model = args.model
        if model is None:
            from tiny_models import save_tiny

            model = str(save_tiny("llama", tmp / "tiny-llama", max_context=4096))
        (tmp / "stack").mkdir()
        # No --redis-url: `wicore up` takes the local Redis if it answers, else starts a private one.
        stack = start_stack(tmp / "stack", model, args.redis_url, 1, parse_settings(args.set))
        try:
            report = asyncio.run(
                soak(stack, args.requests, args.concurrency, warmup, args.interval, args.seed)
            )
        finally:
            code = stack.stop()
    print(table(report))
    if code != 0:
        print(f"wicore up exited with {code}")
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=1))
    return 0 if report.ok and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
