"""Stress test: hours of closed-loop load at full concurrency, watching every service for memory,
file-descriptor and thread leaks, restarts and request errors.

    python benchmark/stress_test.py --max_concurrent 64 --duration 3600 --ramp_up 300
        [--target HOST:PORT | --http URL] [--metrics NAME=HOST:PORT,...] [--model smollm2]
        [--sample_interval 5] [--warmup 60] [--rss_growth_limit_mib 64] [--fd_growth_limit 0]
        [--prompt_lens 32,128,512] [--output_lens 16,64,128] [--seed 0] [--json OUT] [--plot OUT.png]

The target is chosen as in the rest of the suite (benchmark/serving.py): a running gateway's gRPC
API (`--target`), its OpenAI API (`--http`), or, without either, a stack started here (`wicore up`)
and stopped at the end. A target that does not answer exits with status 2 before any load.

Load. `--max_concurrent` client loops, each closed: send one streamed request, wait for its last
token, send the next. Loop i (0-based) starts at i / max_concurrent x `--ramp_up` seconds, so the
number of loops grows linearly from 1 to max_concurrent over the ramp; all of them then run for
`--duration` seconds (the hold). Each request's prompt length and output length (`max_tokens`,
`ignore_eos`) are drawn from `--prompt_lens` and `--output_lens` by an RNG seeded with `--seed`;
prompts are fresh text of that many tokens (benchmark/prompts.py). At the end of the hold no new
request is sent, the ones in flight are waited for, then the workers until idle (their /metrics
show nothing running or waiting, up to 60 s; without /metrics, 2 s), and the end sample is taken.

Samples, every `--sample_interval` seconds (x = seconds since the first loop started), per service
(gateway, scheduler, tier, worker-i): resident memory (RSS), open file descriptors and threads,
from /proc when the processes are local (a stack started here; the fds also by kind), else from
each service's /metrics (`process_resident_memory_bytes`, `process_open_fds`; threads unknown);
the process' identity (pid, `process_start_time_seconds`); the worker's KV-cache usage
(`wicore:kv_cache_usage_perc`) and its running/waiting requests; the tier's used and capacity
bytes per tier (`wicore:tier_used_bytes`, `wicore:tier_capacity_bytes`); the gateway's requests in
flight and tokens streamed (`wicore:generation_tokens_total`). Client side: loops running,
requests in flight, completed, errors by gRPC status code, output tokens per second over the last
interval (counted when a request completes). The baseline sample is taken `--warmup` seconds after
the ramp (default min(60, duration / 5)): start-up, the ramp and the caches and connection pools
filling up are not the leak test's business.

Verdict. FAIL (exit status 1), with each reason printed, when any of these holds; else PASS (0):
  - a request failed (any gRPC status but OK; the count per code is printed);
  - no request completed at all;
  - a service's RSS at the end sample exceeds its RSS at the baseline sample by more than
    `--rss_growth_limit_mib` MiB (default 64), not counting, for the tier service, the growth of
    the blocks its CPU tier holds (`wicore:tier_used_bytes{tier="cpu"}`: a cache bounded by
    `tier.cpu_capacity_bytes`, filling up, is not a leak; its allocator overhead is counted);
  - a service's open fds at the end sample exceed those at the baseline by more than
    `--fd_growth_limit` (default 0) AND exceed by more than that the highest count in the first
    half (by time) of the baseline-to-end window: a pool that grows to the peak of its use and
    stays there (the scheduler's Redis connections, bounded) is a step, a leak keeps growing
    through the second half. For a local process the reason names the kinds that grew (socket,
    pipe, file, anon_inode:[eventfd], ...);
  - a service's process disappeared or restarted: its pid or its start time changed between two
    samples, or a local process was gone in any sample (a remote one: its /metrics did not answer
    at the end sample; a missed scrape before that is only noted);
  - a worker still had requests running or waiting at the end sample (after up to 60 s of idling);
  - there is no baseline or no end sample.
Growth is judged only where both samples measured it (a remote target without `--metrics`
measures nothing and says so). Threads, KV usage and tier bytes are reported, not judged.

Report: a table per service (RSS baseline / end / max from the baseline on / growth in MiB, fds
baseline / end, threads baseline / end), the totals (requests, errors by code, output tok/s over
the load's wall time, TTFT and ITL p50/p95), and the verdict. `--json`: the parameters, the machine,
the target, every sample, the summary and the verdict with its reasons. `--plot`: panels over time
(RSS, open fds, threads per service; KV-cache usage and tier used bytes; in-flight requests and
errors; output throughput), the baseline marked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import re
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serving
from prompts import Prompt, PromptGenerator, tokenizer_functions

MIB = 1 << 20
IDLE_TIMEOUT_S = 60.0
IDLE_WITHOUT_METRICS_S = 2.0
SETTLE_S = 0.5
START_TIME_TOLERANCE_S = 0.5  # process_start_time_seconds comes from /proc's ticks: equal unless restarted


# --- the load's schedule ---


def ramp_schedule(max_concurrent: int, ramp_up: float) -> list[float]:
    """When client loop i starts (seconds from the run's start): i / max_concurrent x ramp_up."""
    return [i / max_concurrent * ramp_up for i in range(max_concurrent)]


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


# --- the verdict: a pure function of the samples ---


@dataclass
class Verdict:
    passed: bool
    reasons: list[str]  # why it failed; empty when it passed
    notes: list[str] = field(default_factory=list)  # what could not be judged, or was only seen
    services: dict[str, dict[str, Any]] = field(default_factory=dict)  # the per-service table


def _labelled(samples: Sequence[dict[str, Any]], label: str) -> dict[str, Any] | None:
    return next((s for s in samples if s.get("label") == label), None)


def _mib(value: float | None) -> float | None:
    return None if value is None else value / MIB


def judge(
    samples: Sequence[dict[str, Any]], rss_growth_limit_mib: float = 64, fd_growth_limit: int = 0
) -> Verdict:
    """The verdict on a run's samples (the rules of the module docstring). A sample is
    {"t", "label" ("baseline", "end" or absent), "services": {name: {"pid", "up", "start_time",
    "rss_bytes", "open_fds", "threads", ["running", "waiting"]}}, "client": {"completed",
    "errors": {code: n}}}; a value nobody measured is None or absent."""
    reasons: list[str] = []
    notes: list[str] = []
    baseline = _labelled(samples, "baseline")
    end = _labelled(samples, "end")
    if baseline is None:
        reasons.append("no baseline sample (the run ended before the warm-up did)")
    if end is None:
        reasons.append("no end sample")
        end = samples[-1] if samples else None

    if end is not None:
        client = end.get("client", {})
        errors = {code: n for code, n in client.get("errors", {}).items() if n}
        if errors:
            listed = ", ".join(f"{code} {n}" for code, n in sorted(errors.items(), key=lambda kv: -kv[1]))
            reasons.append(f"{sum(errors.values())} request(s) failed: {listed}")
        if not client.get("completed"):
            reasons.append("no request completed")

    names: list[str] = []
    for s in samples:
        names += [n for n in s.get("services", {}) if n not in names]
    table: dict[str, dict[str, Any]] = {}
    for name in names:
        series = [(s, s["services"][name]) for s in samples if name in s.get("services", {})]
        reasons += _identity(name, series, end, notes)
        base = (baseline or {}).get("services", {}).get(name, {})
        last = (end or {}).get("services", {}).get(name, {})
        after = samples[samples.index(baseline) :] if baseline is not None else samples
        rss_after = [
            v for s in after if (v := s.get("services", {}).get(name, {}).get("rss_bytes")) is not None
        ]
        row: dict[str, Any] = {
            "rss_baseline_mib": _mib(base.get("rss_bytes")),
            "rss_end_mib": _mib(last.get("rss_bytes")),
            "rss_max_mib": _mib(max(rss_after)) if rss_after else None,
            "rss_growth_mib": None,
            "fds_baseline": base.get("open_fds"),
            "fds_end": last.get("open_fds"),
            "fds_growth": None,
            "threads_baseline": base.get("threads"),
            "threads_end": last.get("threads"),
        }
        cache_base, cache_end = _ram_cache(base), _ram_cache(last)
        cache = (cache_end - cache_base) / MIB if cache_base is not None and cache_end is not None else 0.0
        row["cache_growth_mib"] = cache
        if row["rss_baseline_mib"] is not None and row["rss_end_mib"] is not None:
            growth = row["rss_growth_mib"] = row["rss_end_mib"] - row["rss_baseline_mib"]
            if growth - cache > rss_growth_limit_mib:
                cached = f", {cache:.1f} MiB of it the blocks its CPU tier holds" if cache else ""
                reasons.append(
                    f"{name}: RSS grew {growth:.1f} MiB ({row['rss_baseline_mib']:.1f} -> "
                    f"{row['rss_end_mib']:.1f} MiB) from the baseline to the end{cached}: "
                    f"{growth - cache:.1f} MiB above the {rss_growth_limit_mib:g} MiB bound"
                )
        elif baseline is not None:
            notes.append(f"{name}: RSS not measured at the baseline and the end; growth not judged")
        if row["fds_baseline"] is not None and row["fds_end"] is not None:
            fd_growth = row["fds_growth"] = row["fds_end"] - row["fds_baseline"]
            plateau = _first_half_max(after, name, "open_fds")
            row["fds_first_half_max"] = plateau
            if fd_growth > fd_growth_limit and row["fds_end"] - plateau > fd_growth_limit:
                reasons.append(
                    f"{name}: open fds grew by {fd_growth} ({row['fds_baseline']} -> {row['fds_end']}) "
                    f"from the baseline to the end, and by {row['fds_end'] - plateau} in the second half "
                    f"of it, above the bound of {fd_growth_limit}"
                    + _kinds_grown(base.get("fd_kinds"), last.get("fd_kinds"))
                )
        elif baseline is not None:
            notes.append(f"{name}: open fds not measured at the baseline and the end; growth not judged")
        held = (last.get("running") or 0) + (last.get("waiting") or 0)
        if held:
            reasons.append(
                f"{name}: {last.get('running') or 0} request(s) running and {last.get('waiting') or 0} "
                "waiting at the end, after the load stopped"
            )
        table[name] = row
    if not names:
        notes.append("no service was measured (a remote target: give --metrics NAME=HOST:PORT,...)")
    return Verdict(not reasons, reasons, notes, table)


def _ram_cache(service: dict[str, Any]) -> float | None:
    """Bytes of blocks a tier service holds in its CPU tier (None: not a tier, or not measured)."""
    used = service.get("tier_used_bytes") or {}
    value = used.get("cpu")
    return float(value) if value is not None else None


def _first_half_max(after: Sequence[dict[str, Any]], name: str, key: str) -> int:
    """The highest `key` of service `name` in the samples of the first half (by time) of `after`
    (the baseline sample first, the end sample last)."""
    middle = (after[0]["t"] + after[-1]["t"]) / 2
    values = [
        v
        for s in after
        if s["t"] <= middle and (v := s.get("services", {}).get(name, {}).get(key)) is not None
    ]
    return max(values) if values else 0


def _kinds_grown(before: dict[str, int] | None, after: dict[str, int] | None) -> str:
    """ ": socket +2, pipe +1": the kinds of descriptor that grew, where known."""
    if before is None or after is None:
        return ""
    grown = {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}
    return (": " + ", ".join(f"{k} +{n}" for k, n in sorted(grown.items()))) if grown else ""


def _identity(
    name: str,
    series: list[tuple[dict[str, Any], dict[str, Any]]],
    end: dict[str, Any] | None,
    notes: list[str],
) -> list[str]:
    """Reasons about one service's process: gone, or restarted (pid or start time changed)."""
    reasons: list[str] = []
    first_pid = first_start = None
    missed = 0
    for sample, svc in series:
        t = sample.get("t", 0.0)
        pid, start = svc.get("pid"), svc.get("start_time")
        if not svc.get("up", True):
            if pid is not None:
                reasons.append(f"{name}: process {pid} gone at t={t:.1f} s")
                break
            if sample is end:
                reasons.append(f"{name}: its /metrics did not answer at the end (t={t:.1f} s)")
                break
            missed += 1
            continue
        if pid is not None:
            if first_pid is None:
                first_pid = pid
            elif pid != first_pid:
                reasons.append(f"{name}: restarted, pid {first_pid} -> {pid} at t={t:.1f} s")
                break
        if start is not None:
            if first_start is None:
                first_start = start
            elif abs(start - first_start) > START_TIME_TOLERANCE_S:
                reasons.append(f"{name}: restarted, its process start time changed at t={t:.1f} s")
                break
    if missed:
        notes.append(f"{name}: its /metrics did not answer {missed} sample(s) before the end")
    return reasons


# --- sampling ---


_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric_by_label(samples: dict[str, float], name: str, label: str) -> dict[str, float]:
    """One metric's values summed per value of `label` ({} if absent), from `serving.scrape`'s keys."""
    out: dict[str, float] = {}
    for key, value in samples.items():
        if key.startswith(name + "{"):
            labels = dict(_LABEL.findall(key[len(name) :]))
            if label in labels:
                out[labels[label]] = out.get(labels[label], 0.0) + value
    return out


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def fd_kinds(pid: int) -> dict[str, int]:
    """A local process' open descriptors by kind: socket, pipe, anon_inode:[eventfd], file, dev, ..."""
    kinds: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue  # closed meanwhile
            if link.startswith("/dev/"):
                kind = "dev"
            elif link.startswith("/"):
                kind = "file"
            elif link.startswith("anon_inode:"):
                kind = link
            else:
                kind = link.split(":", 1)[0]  # socket:[inode], pipe:[inode]
            kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items()))


def sample_service(pid: int | None, metrics_address: str | None) -> dict[str, Any]:
    """One service now: its process from /proc (when local), the rest from its /metrics (blocking)."""
    out: dict[str, Any] = {"pid": pid, "up": True, "start_time": None, "rss_bytes": None,
                           "open_fds": None, "threads": None, "cpu_s": None}  # fmt: skip
    if pid is not None:  # /proc first: the scrape's own connection is not counted
        process = serving.sample_process(pid)
        if process is None:
            out["up"] = False
        else:
            out |= {"rss_bytes": process.rss_bytes, "open_fds": process.open_fds,
                    "threads": process.threads, "cpu_s": process.cpu_s}  # fmt: skip
            out["fd_kinds"] = fd_kinds(pid)
    metrics = serving.scrape(metrics_address) if metrics_address else {}
    if pid is None and metrics_address:
        out["up"] = bool(metrics)
        out["rss_bytes"] = _int(serving.metric_sum(metrics, "process_resident_memory_bytes"))
        out["open_fds"] = _int(serving.metric_sum(metrics, "process_open_fds"))
        out["cpu_s"] = serving.metric_sum(metrics, "process_cpu_seconds_total")
    out["start_time"] = serving.metric_sum(metrics, "process_start_time_seconds")
    if (usage := serving.metric_sum(metrics, "wicore:kv_cache_usage_perc")) is not None:
        out["kv_cache_usage"] = usage
        out["running"] = _int(serving.metric_sum(metrics, "wicore:num_requests_running"))
        out["waiting"] = _int(serving.metric_sum(metrics, "wicore:num_requests_waiting"))
    if (used := metric_by_label(metrics, "wicore:tier_used_bytes", "tier")) or serving.metric_sum(
        metrics, "wicore:tier_capacity_bytes"
    ) is not None:
        out["tier_used_bytes"] = {k: int(v) for k, v in used.items()}
        out["tier_capacity_bytes"] = {
            k: int(v) for k, v in metric_by_label(metrics, "wicore:tier_capacity_bytes", "tier").items()
        }
    if (in_flight := serving.metric_sum(metrics, "wicore:gateway_requests_in_flight")) is not None:
        out["in_flight"] = int(in_flight)
        out["generation_tokens"] = _int(serving.metric_sum(metrics, "wicore:generation_tokens_total"))
    return out


def service_names(target: serving.Target) -> list[str]:
    names = set(target.pids) | set(target.metrics)
    order = {"gateway": 0, "scheduler": 1, "tier": 2}

    def key(name: str) -> tuple[int, int, str]:
        if name.startswith("worker-") and name[7:].isdigit():
            return (3, int(name[7:]), name)
        return (order.get(name, 4), 0, name)

    return sorted(names, key=key)


def sample_services(target: serving.Target) -> dict[str, dict[str, Any]]:
    return {
        name: sample_service(target.pids.get(name), target.metrics.get(name))
        for name in service_names(target)
    }


# --- the run ---


@dataclass
class ClientState:
    """What the client loops have done so far (touched only on the event loop)."""

    loops: int = 0
    in_flight: int = 0
    completed: int = 0
    output_tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    records: list[serving.RequestRecord] = field(default_factory=list)
    itl: array[float] = field(default_factory=lambda: array("d"))  # every ITL, compactly
    last_done: float = 0.0

    def snapshot(self) -> dict[str, Any]:
        return {"loops": self.loops, "in_flight": self.in_flight, "completed": self.completed,
                "output_tokens": self.output_tokens, "errors": dict(self.errors)}  # fmt: skip


class Run:
    """One stress run against `target` (see the module docstring)."""

    def __init__(
        self, args: argparse.Namespace, target: serving.Target, make_prompt: Callable[[int], Prompt]
    ):
        self.args = args
        self.target = target
        self.make_prompt = make_prompt
        self.rng = random.Random(args.seed)
        self.state = ClientState()
        self.samples: list[dict[str, Any]] = []
        self.stop_sending = False
        self.started = 0.0
        self.hold_end = args.ramp_up + args.duration
        self.baseline_t = args.ramp_up + args.warmup
        self._last_tokens = (0.0, 0)  # (t, output tokens) at the previous sample
        self._pending: asyncio.Future[dict[str, dict[str, Any]]] | None = None

    def now(self) -> float:
        return time.perf_counter() - self.started

    def phase(self, t: float) -> str:
        if self.stop_sending:
            return "drain"
        return "ramp" if t < self.args.ramp_up else "hold"

    async def take_sample(self, label: str | None = None) -> dict[str, Any]:
        # Shielded: a sample cancelled with the sampler still ends before the next one starts.
        self._pending = asyncio.ensure_future(asyncio.to_thread(sample_services, self.target))
        services = await asyncio.shield(self._pending)
        t = self.now()
        client = self.state.snapshot()
        last_t, last_tokens = self._last_tokens
        client["output_tok_s"] = (client["output_tokens"] - last_tokens) / (t - last_t) if t > last_t else 0.0
        self._last_tokens = (t, client["output_tokens"])
        sample: dict[str, Any] = {
            "t": round(t, 3),
            "phase": self.phase(t),
            "services": services,
            "client": client,
        }
        if label:
            sample["label"] = label
        self.samples.append(sample)
        return sample

    async def sampler(self) -> None:
        """A sample every interval; the baseline at its time exactly (labelled)."""
        interval = self.args.sample_interval
        k = 0
        baseline_taken = False
        while True:
            next_t = k * interval
            if not baseline_taken and self.baseline_t <= next_t:
                await asyncio.sleep(max(0.0, self.baseline_t - self.now()))
                if self.stop_sending:  # the hold ended first: no baseline
                    baseline_taken = True
                    continue
                await self.take_sample("baseline")
                baseline_taken = True
                if next_t - self.baseline_t < interval / 2:
                    k += 1  # the baseline stands in for the periodic sample this close to it
                continue
            await asyncio.sleep(max(0.0, next_t - self.now()))
            await self.take_sample()
            k += 1

    async def loop(self, client: serving.Client, start_at: float) -> None:
        await asyncio.sleep(max(0.0, start_at - self.now()))
        if self.stop_sending:
            return
        state = self.state
        state.loops += 1
        try:
            while not self.stop_sending:
                prompt_len = self.rng.choice(self.args.prompt_lens)
                max_tokens = self.rng.choice(self.args.output_lens)
                prompt = self.make_prompt(prompt_len)
                state.in_flight += 1
                try:
                    record = await client.send(prompt.text, prompt.tokens, max_tokens, self.now())
                finally:
                    state.in_flight -= 1
                state.itl.extend(record.itl)
                record.itl = []
                state.records.append(record)
                state.last_done = self.now()
                if record.error is None:
                    state.completed += 1
                    state.output_tokens += record.output_tokens
                else:
                    state.errors[record.error] = state.errors.get(record.error, 0) + 1
        finally:
            state.loops -= 1

    async def wait_idle(self) -> bool:
        """Until the workers run and queue nothing and the gateway serves nothing (their /metrics),
        up to IDLE_TIMEOUT_S; without a worker's /metrics, IDLE_WITHOUT_METRICS_S."""
        workers = [a for n, a in self.target.metrics.items() if n.startswith("worker")]
        if not workers:
            await asyncio.sleep(IDLE_WITHOUT_METRICS_S)
            return True
        gateway = self.target.metrics.get("gateway")
        deadline = time.monotonic() + IDLE_TIMEOUT_S
        while time.monotonic() < deadline:
            if await asyncio.to_thread(_idle, workers, gateway):
                return True
            await asyncio.sleep(0.25)
        return False

    async def run(self) -> float:
        """Ramp, hold, drain, idle, end sample; the load's wall time (first send to last reply)."""
        args = self.args
        bar = serving.progress(self.hold_end, "stress")
        async with serving.clients(self.target) as client:
            self.started = time.perf_counter()
            sampling = asyncio.create_task(self.sampler())
            loops = [
                asyncio.create_task(self.loop(client, t))
                for t in ramp_schedule(args.max_concurrent, args.ramp_up)
            ]
            shown = 0.0
            try:
                while (t := self.now()) < self.hold_end:
                    await asyncio.sleep(min(1.0, self.hold_end - t))
                    t = min(self.now(), self.hold_end)
                    bar.update(t - shown)
                    shown = t
                    s = self.state
                    errors = sum(s.errors.values())
                    bar.set_postfix_str(
                        f"loops {s.loops} in flight {s.in_flight} done {s.completed} errors {errors}"
                    )
                self.stop_sending = True
                bar.close()
                print(
                    f"hold over: waiting for {self.state.in_flight} request(s) in flight...", file=sys.stderr
                )
                await asyncio.gather(*loops)
                wall = self.state.last_done
                idle = await self.wait_idle()
                if not idle:
                    print(f"the workers were not idle after {IDLE_TIMEOUT_S:g} s", file=sys.stderr)
            finally:
                self.stop_sending = True
                sampling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampling
                for task in loops:
                    task.cancel()
                bar.close()
            if self._pending is not None:
                await asyncio.wait([self._pending])
            await asyncio.sleep(SETTLE_S)  # the idle check's scrapes closed on the services' side too
            await self.take_sample("end")  # the client's channel still open, as at the baseline
        return wall


def _idle(workers: list[str], gateway: str | None) -> bool:
    for address in workers:
        metrics = serving.scrape(address)
        running = serving.metric_sum(metrics, "wicore:num_requests_running")
        waiting = serving.metric_sum(metrics, "wicore:num_requests_waiting")
        if running is None or waiting is None or running + waiting > 0:
            return False
    if gateway:
        in_flight = serving.metric_sum(serving.scrape(gateway), "wicore:gateway_requests_in_flight")
        if in_flight:
            return False
    return True


# --- reporting ---


def service_table(verdict: Verdict) -> str:
    rows = [
        [name, r["rss_baseline_mib"], r["rss_end_mib"], r["rss_max_mib"], r["rss_growth_mib"],
         r.get("cache_growth_mib"), r["fds_baseline"], r["fds_end"], r["threads_baseline"], r["threads_end"]]
        for name, r in verdict.services.items()
    ]  # fmt: skip
    headers = ["service", "RSS base MiB", "RSS end MiB", "RSS max MiB", "RSS growth MiB",
               "of it cached blocks MiB", "fds base", "fds end", "threads base", "threads end"]  # fmt: skip
    return serving.markdown_table(headers, rows)


def totals_text(summary: dict[str, Any]) -> str:
    errors = ", ".join(f"{c} {n}" for c, n in sorted(summary["errors"].items())) or "none"
    return (
        f"requests {summary['requests']}, completed {summary['completed']}, errors: {errors}\n"
        f"output {summary['output_tok_s']:.1f} tok/s, {summary['request_throughput']:.2f} req/s over "
        f"{summary['duration_s']:.1f} s\n"
        f"TTFT p50 {summary['ttft_ms']['p50']:.1f} ms, p95 {summary['ttft_ms']['p95']:.1f} ms; "
        f"ITL p50 {summary['itl_ms']['p50']:.1f} ms, p95 {summary['itl_ms']['p95']:.1f} ms"
    )


def plot(path: str, samples: Sequence[dict[str, Any]], args: argparse.Namespace) -> None:
    plt = serving.pyplot()
    fig, axes = plt.subplots(3, 2, figsize=(14, 11), sharex=True)
    t = [s["t"] for s in samples]
    names: list[str] = []
    for s in samples:
        names += [n for n in s["services"] if n not in names]

    def series(name: str, key: str, scale: float = 1.0) -> list[float]:
        out = []
        for s in samples:
            v = s["services"].get(name, {}).get(key)
            out.append(math.nan if v is None else v / scale)
        return out

    panels = [(axes[0][0], "rss_bytes", MIB, "RSS (MiB)"), (axes[0][1], "open_fds", 1.0, "open fds"),
              (axes[1][0], "threads", 1.0, "threads")]  # fmt: skip
    for ax, key, scale, title in panels:
        for name in names:
            ax.plot(t, series(name, key, scale), label=name)
        ax.set_title(title)
        ax.legend(fontsize="small")

    ax = axes[1][1]
    for name in names:
        if any(s["services"].get(name, {}).get("kv_cache_usage") is not None for s in samples):
            ax.plot(t, [100 * v for v in series(name, "kv_cache_usage")], label=f"{name} KV cache %")
    ax.set_ylabel("KV cache usage (%)")
    ax.set_ylim(0, 105)
    ax.set_title("KV cache usage and tier used bytes")
    tier_ax = ax.twinx()
    levels: list[tuple[str, str]] = []
    for s in samples:
        for name, svc in s["services"].items():
            levels += [(name, lvl) for lvl in svc.get("tier_used_bytes", {}) if (name, lvl) not in levels]
    for name, lvl in levels:
        used = [s["services"].get(name, {}).get("tier_used_bytes", {}).get(lvl) for s in samples]
        tier_ax.plot(t, [math.nan if v is None else v / MIB for v in used], "--", label=f"tier {lvl} MiB")
    tier_ax.set_ylabel("tier used (MiB)")
    handles = ax.get_legend_handles_labels()
    tier_handles = tier_ax.get_legend_handles_labels()
    ax.legend(handles[0] + tier_handles[0], handles[1] + tier_handles[1], fontsize="small")

    ax = axes[2][0]
    ax.plot(t, [s["client"]["in_flight"] for s in samples], label="in flight")
    ax.plot(t, [s["client"]["loops"] for s in samples], label="client loops")
    ax.plot(
        t, [sum(s["client"]["errors"].values()) for s in samples], label="errors (cumulative)", color="red"
    )
    ax.set_title("requests")
    ax.legend(fontsize="small")

    ax = axes[2][1]
    ax.plot(t, [s["client"]["output_tok_s"] for s in samples], label="client: completed requests' tokens")
    streamed = series("gateway", "generation_tokens")
    if any(not math.isnan(v) for v in streamed):
        rates = [math.nan] + [
            (b - a) / (t1 - t0) if t1 > t0 else math.nan
            for a, b, t0, t1 in zip(streamed, streamed[1:], t, t[1:], strict=False)
        ]
        ax.plot(t, rates, label="gateway: tokens streamed")
    ax.set_title("output tokens/s, per interval")
    ax.legend(fontsize="small")

    baseline = _labelled(samples, "baseline")
    for row in axes:
        for ax in row:
            ax.axvspan(0, args.ramp_up, color="0.9", zorder=0)
            if baseline is not None:
                ax.axvline(baseline["t"], color="green", linestyle=":", label="_baseline")
            ax.axvline(args.ramp_up + args.duration, color="black", linestyle=":", label="_hold end")
            ax.grid(alpha=0.3)
    for ax in axes[2]:
        ax.set_xlabel("seconds (grey: ramp-up; green: baseline after warm-up; black: end of the hold)")
    fig.suptitle(f"stress: {args.max_concurrent} loops, ramp {args.ramp_up:g} s, hold {args.duration:g} s")
    serving.save_figure(fig, path)


# --- the command line ---


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    serving.add_common_args(parser)
    parser.add_argument(
        "--max_concurrent", type=int, default=64, help="client loops at full load (default 64)"
    )
    parser.add_argument("--duration", type=float, default=3600, help="hold time, seconds (default 3600)")
    parser.add_argument(
        "--ramp_up", type=float, default=300, help="seconds from 1 to max_concurrent loops (default 300)"
    )
    parser.add_argument(
        "--sample_interval", type=float, default=5, help="seconds between samples (default 5)"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds after the ramp before the baseline sample (default min(60, duration / 5))",
    )
    parser.add_argument(
        "--rss_growth_limit_mib",
        type=float,
        default=64,
        help="most RSS growth per service from the baseline to the end, MiB (default 64)",
    )
    parser.add_argument(
        "--fd_growth_limit", type=int, default=0, help="most open-fd growth per service (default 0)"
    )
    parser.add_argument("--prompt_lens", type=int_list, default=[32, 128, 512], help="default 32,128,512")
    parser.add_argument("--output_lens", type=int_list, default=[16, 64, 128], help="default 16,64,128")
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(60.0, args.duration / 5)
    if args.max_concurrent < 1:
        parser.error("--max_concurrent must be at least 1")
    if args.duration <= 0 or args.ramp_up < 0 or args.sample_interval <= 0 or args.warmup < 0:
        parser.error("--duration and --sample_interval must be positive, --ramp_up and --warmup not negative")
    if args.warmup >= args.duration:
        parser.error("--warmup must be shorter than --duration (the baseline is taken during the hold)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    params = {k: getattr(args, k) for k in (
        "max_concurrent", "duration", "ramp_up", "sample_interval", "warmup", "rss_growth_limit_mib",
        "fd_growth_limit", "prompt_lens", "output_lens", "seed", "model", "workers", "set",
    )}  # fmt: skip
    with serving.open_target(args) as target:
        encode, decode = tokenizer_functions(target.model_dir)
        generator = PromptGenerator(encode, decode, args.seed)
        services = service_names(target)
        print(
            f"stress: {target.name}; watching {', '.join(services) or 'no service (give --metrics)'}; "
            f"{args.max_concurrent} loops over {args.ramp_up:g} s, hold {args.duration:g} s, "
            f"baseline at t={args.ramp_up + args.warmup:g} s",
            file=sys.stderr,
        )
        run = Run(args, target, generator.prompt)
        wall = asyncio.run(run.run())
        target_name = target.name
    verdict = judge(run.samples, args.rss_growth_limit_mib, args.fd_growth_limit)
    summary = serving.summarize(run.state.records, wall)
    summary["itl_ms"] = serving.latency_summary(run.state.itl)

    print(f"\n## Stress test: {target_name}\n")
    print(
        f"{args.max_concurrent} client loops, ramp-up {args.ramp_up:g} s, hold {args.duration:g} s, "
        f"baseline {args.warmup:g} s after the ramp; bounds per service from the baseline to the end: "
        f"RSS +{args.rss_growth_limit_mib:g} MiB, open fds +{args.fd_growth_limit}\n"
    )
    print(service_table(verdict))
    print()
    print(totals_text(summary))
    for note in verdict.notes:
        print(f"note: {note}")
    print(f"\nverdict: {'PASS' if verdict.passed else 'FAIL'}")
    for reason in verdict.reasons:
        print(f"  - {reason}")

    serving.write_json(
        args.json,
        {
            "params": params,
            "machine": serving.machine(),
            "target": target_name,
            "summary": summary,
            "services": verdict.services,
            "verdict": {"passed": verdict.passed, "reasons": verdict.reasons, "notes": verdict.notes},
            "samples": run.samples,
        },
    )
    if args.plot:
        plot(args.plot, run.samples, args)
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
