"""Latency under load: how TTFT, inter-token latency and end-to-end latency grow with the offered
request rate, for several sizes of client pool, and the rate at which latency bends (the knee).

    python benchmark/latency_test.py --concurrent_users 1,5,10,20,32 --request_rate 1,5,10,20
    python benchmark/latency_test.py --target 10.0.0.5:50051 --duration 120 --json out.json --plot out.png
    python benchmark/latency_test.py --http http://10.0.0.5:8000/v1 --request_rate 2,4,8,inf

Without `--target`/`--http` a stack serving `--model` is started here and stopped at the end (see
benchmark/serving.py for the targets, how one request is timed, and the statistics).

The grid. Every `--concurrent_users` x `--request_rate` pair is one cell, run one after the other
on one connection, after one uncounted warm-up request. In a cell, requests arrive open-loop as a
Poisson process (exponential gaps from a seeded RNG) at the offered rate for `--duration` seconds;
`inf` sends `--burst_requests` requests at once instead (vLLM's benchmark_serving semantics). The
arrival schedule is seeded by `--seed` and the rate alone, so cells of the same rate see the same
arrival times whatever the pool size; prompts (`benchmark/prompts.py`, `--prompt_len` tokens of
real text, each from a different place of the corpus so that no prompt is a prefix-cache hit on
another) come from one generator seeded by `--seed`; every request asks for exactly `--output_len`
tokens. After the arrivals stop, in-flight requests get up to `--drain` seconds to finish; those
still running then are cancelled and counted as ABANDONED: the client gave up on them, the server
did not fail them, so they do not make the exit status 1 (an overloaded cell shows them instead).

The client pool. At most `users` requests are in flight at once. An arrival that finds every user
busy waits (FIFO) for one to free up, and that wait counts in its TTFT and end-to-end latency:
latencies run from the arrival time, as a user behind a capped client pool sees them (no
coordinated omission). So past the pool's capacity (about users / e2e requests per second) latency
grows with the queue, even if the server itself is not saturated. ITLs are not affected.

Reading the numbers (one row per cell; latencies in ms):
- offered req/s: the rate asked for. achieved req/s: the rate the completions kept up with: the
  arrivals' own rate ((n - 1) / (last arrival - first arrival); a short Poisson run can be off the
  offered rate by chance) divided by the least-squares slope of completion time against arrival
  time over the completed requests. That slope is 1 while requests take about as long late in the
  cell as early (latency noise does not bias it), and offered / sustained once a queue builds up
  and each request finishes later than the one before, so achieved is then the rate the server
  (or the pool) sustains. An `inf` cell (all arrivals at once): (completed - 1) / the time from
  the first completion to the last.
- TTFT, ITL and e2e p50/p95/p99: over the cell's completed requests (ITL over all their gaps).
- out tok/s: output tokens / the cell's wall time (its start to its last completion), vLLM's way.
- goodput: completed requests per second of that wall time whose TTFT <= --slo-ttft-ms and mean
  ITL <= --slo-itl-ms, and the share of completed requests that met both.
- errors: failed requests by gRPC status name (HTTP statuses mapped, see serving.py), and
  ABANDONED: requests the client cancelled when `--drain` ran out (overload, not a failure).

The knee, per pool size: the lowest offered rate at which the p50 end-to-end latency exceeds
KNEE_LATENCY_FACTOR (2) x its value at the lowest tested rate, or at which the achieved rate falls
below KNEE_SATURATION_FRACTION (90 %) of the arrivals' rate (saturation: requests pile up faster
than they complete). None when no tested rate qualifies: the knee lies beyond the highest rate.
Compared with the arrivals' measured rate rather than the nominal one, so that Poisson noise in a
short cell is not taken for saturation; still, with a few dozen requests whose latencies spread
over seconds, the achieved rate is only good to about 10 %: judge knees on long cells (the default
60 s). An `inf` cell is always saturated by this rule.

Outputs: the markdown table and the knees on stdout; --json OUT: the parameters, the machine, the
target, every cell's numbers (serving.summarize's, plus the rates and the client-side queue waits)
and the knees; --plot OUT.png: TTFT p50/p99 and e2e p50 against the offered rate (log axis), one
colour per pool size, and goodput in a second panel. Exit status 0; 1 if any request failed
(ABANDONED ones aside); 2 if the target does not answer.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving
from serving import Client, RequestRecord, Target

KNEE_LATENCY_FACTOR = 2.0
KNEE_SATURATION_FRACTION = 0.9
EXIT_FAILED = 1
DRAIN_ERROR = "ABANDONED"  # still in flight (or queued) when --drain ran out: cancelled by the client
CLIENT_ERROR = "UNKNOWN"  # the client raised something other than a status


# --- the arrivals ---


def parse_users(text: str) -> list[int]:
    try:
        users = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if not users or min(users) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return users


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(s) for s in text.split(",") if s.strip()]  # float() reads "inf"
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of rates or inf, got {text!r}") from None
    if not rates or any(not r > 0 for r in rates):  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected positive rates, got {text!r}")
    return rates


def derived_seed(seed: int, *parts: object) -> int:
    """A 64-bit seed from `seed` and `parts`, the same in every process (unlike hash())."""
    digest = hashlib.sha256("/".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def arrival_times(rate: float, duration_s: float, rng: random.Random, burst: int = 1) -> list[float]:
    """Arrival offsets (s) from a cell's start: a Poisson process of `rate` per second over
    [0, duration_s) (independent exponential gaps of mean 1/rate, the first one included); for an
    infinite rate, `burst` arrivals at 0."""
    if math.isinf(rate):
        return [0.0] * burst
    times: list[float] = []
    t = rng.expovariate(rate)
    while t < duration_s:
        times.append(t)
        t += rng.expovariate(rate)
    return times


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The least-squares slope of ys against xs; NaN with fewer than two points or constant xs."""
    if len(xs) < 2:
        return math.nan
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    return sxy / sxx if sxx > 0 else math.nan


def achieved_rate(arrival_rate: float, sent: Sequence[float], completed: Sequence[float]) -> float:
    """The rate completions kept up with (see the module doc): arrival_rate / the slope of the
    completed requests' completion times against their arrival times (`sent`); without a slope
    (arrivals at one instant), event_rate of the completions; NaN with fewer than two."""
    b = slope(sent, completed)
    if math.isnan(b):
        return event_rate(completed)
    return arrival_rate / b if b > 0 else math.inf


def event_rate(times: Sequence[float]) -> float:
    """Events per second between the first and the last: (n - 1) / span; inf if they coincide,
    NaN with fewer than two."""
    if len(times) < 2:
        return math.nan
    span = max(times) - min(times)
    return (len(times) - 1) / span if span > 0 else math.inf


# --- one cell ---


@dataclass(frozen=True)
class Request:
    text: str
    tokens: int  # the prompt's length in tokens of the served model


Take = Callable[[int, int], list[Request]]  # (n, tokens) -> the next n prompts


@dataclass
class CellRun:
    """What one cell's requests did; records in arrival order, `sent` = arrival offset (s)."""

    records: list[RequestRecord]
    queue_waits: list[float]  # seconds each sent request waited for a free user (not the cancelled)
    wall_s: float  # from the cell's start to its last completion (or the drain's end)


async def run_cell(
    client: Client,
    requests: Sequence[Request],
    arrivals: Sequence[float],
    users: int,
    max_tokens: int,
    drain_s: float,
    window_s: float = 0.0,
    clock: Callable[[], float] = time.perf_counter,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> CellRun:
    """Sends requests[i] at arrivals[i] (offsets from now, ascending) with at most `users` in
    flight; an arrival that finds them all busy queues (FIFO) and its wait is added to its TTFT
    and e2e. After the last arrival (and `window_s`, the arrival window's length), waits up to
    `drain_s` for the rest, then cancels what still runs (recorded as DRAIN_ERROR)."""
    assert len(requests) >= len(arrivals), "a request per arrival"
    start = clock()
    users_free = asyncio.Semaphore(users)
    records: list[RequestRecord | None] = [None] * len(arrivals)
    waits: list[float] = []
    client_errors: list[Exception] = []

    async def one(i: int) -> None:
        request, arrival = requests[i], start + arrivals[i]
        async with users_free:
            wait = max(0.0, clock() - arrival)  # the pool's queue, and any lateness of the dispatcher
            waits.append(wait)
            try:
                record = await client.send(request.text, request.tokens, max_tokens, arrivals[i])
            except Exception as exc:  # a client bug, not a status: counted, never fatal to the run
                if not client_errors:
                    print(f"warning: the client raised {exc!r} (counted as {CLIENT_ERROR})", file=sys.stderr)
                client_errors.append(exc)
                record = RequestRecord(arrivals[i], request.tokens, max_tokens, error=CLIENT_ERROR)
        if record.ttft is not None:
            record.ttft += wait
        record.e2e = (record.e2e or 0.0) + wait
        records[i] = record
        if on_done is not None:
            on_done(record)

    tasks: list[asyncio.Task[None]] = []
    for i, offset in enumerate(arrivals):
        delay = start + offset - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    if tasks:
        remaining_window = max(0.0, start + window_s - clock())
        _, pending = await asyncio.wait(tasks, timeout=remaining_window + drain_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    wall_s = clock() - start  # asyncio.wait returns as the last one completes
    out = [
        r if r is not None else RequestRecord(arrivals[i], requests[i].tokens, max_tokens, error=DRAIN_ERROR)
        for i, r in enumerate(records)
    ]
    return CellRun(out, waits, wall_s)


# --- a cell's numbers, and the knee ---


@dataclass(frozen=True)
class CellPoint:
    """What the knee is judged on, for one cell."""

    users: int
    offered_rate: float  # req/s asked for (inf: all at once)
    arrival_rate: float  # req/s the arrivals actually had (event_rate of the arrival times)
    achieved_rate: float  # req/s the completions kept up with (achieved_rate()); NaN: unknown
    e2e_p50_ms: float  # NaN: nothing completed


@dataclass(frozen=True)
class Knee:
    users: int
    rate: float  # the offered rate at which latency bends
    reason: str  # "latency" (p50 e2e > 2x the lowest rate's) or "saturation" (achieved < 90 %)
    e2e_ratio: float  # its p50 e2e / the lowest rate's
    achieved_fraction: float  # its achieved rate / its arrivals' rate


def find_knee(points: Sequence[CellPoint]) -> Knee | None:
    """For the cells of one pool size: the lowest offered rate at which the p50 e2e latency
    exceeds KNEE_LATENCY_FACTOR x its value at the lowest rate (the lowest one that has a value),
    or the achieved rate is below KNEE_SATURATION_FRACTION x the arrivals' rate (an unknown
    achieved rate is not saturation); None if no cell qualifies."""
    ordered = sorted(points, key=lambda p: p.offered_rate)
    base = next((p.e2e_p50_ms for p in ordered if not math.isnan(p.e2e_p50_ms)), math.nan)
    for p in ordered:
        ratio = p.e2e_p50_ms / base if base > 0 else math.nan
        fraction = p.achieved_rate / p.arrival_rate if p.arrival_rate > 0 else math.nan  # x / inf = 0
        if ratio > KNEE_LATENCY_FACTOR:
            return Knee(p.users, p.offered_rate, "latency", ratio, fraction)
        if fraction < KNEE_SATURATION_FRACTION:
            return Knee(p.users, p.offered_rate, "saturation", ratio, fraction)
    return None


def find_knees(points: Sequence[CellPoint]) -> dict[int, Knee | None]:
    """find_knee for each pool size, in the order they first appear."""
    by_users: dict[int, list[CellPoint]] = {}
    for p in points:
        by_users.setdefault(p.users, []).append(p)
    return {users: find_knee(cells) for users, cells in by_users.items()}


@dataclass
class CellResult:
    users: int
    offered_rate: float
    arrivals: int
    arrival_rate: float
    achieved_rate: float
    queue_wait_ms: dict[str, float]
    summary: dict[str, Any]  # serving.summarize over the cell's wall time

    @property
    def point(self) -> CellPoint:
        return CellPoint(
            self.users, self.offered_rate, self.arrival_rate, self.achieved_rate,
            self.summary["e2e_ms"]["p50"],
        )  # fmt: skip


def cell_result(
    users: int, rate: float, arrivals: Sequence[float], run: CellRun, slo_ttft_s: float, slo_itl_s: float
) -> CellResult:
    done = [r for r in run.records if r.ok and r.e2e is not None]
    arrival_rate = event_rate(arrivals)
    achieved = achieved_rate(arrival_rate, [r.sent for r in done], [r.sent + (r.e2e or 0.0) for r in done])
    if not done and arrivals:
        achieved = 0.0
    return CellResult(
        users=users,
        offered_rate=rate,
        arrivals=len(arrivals),
        arrival_rate=arrival_rate,
        achieved_rate=achieved,
        queue_wait_ms=serving.latency_summary(run.queue_waits),
        summary=serving.summarize(run.records, run.wall_s, slo_ttft_s, slo_itl_s),
    )


# --- the report ---

HEADERS = (
    "users", "offered req/s", "achieved req/s", "TTFT p50", "TTFT p95", "TTFT p99", "ITL p50",
    "ITL p95", "e2e p50", "e2e p99", "out tok/s", "goodput req/s", "good %", "errors",
)  # fmt: skip


def table_row(cell: CellResult) -> list[Any]:
    s = cell.summary
    errors = ", ".join(f"{code} {n}" for code, n in sorted(s["errors"].items())) or "0"
    return [
        cell.users, cell.offered_rate, cell.achieved_rate,
        s["ttft_ms"]["p50"], s["ttft_ms"]["p95"], s["ttft_ms"]["p99"],
        s["itl_ms"]["p50"], s["itl_ms"]["p95"], s["e2e_ms"]["p50"], s["e2e_ms"]["p99"],
        s["output_tok_s"], s["goodput"], 100 * s["goodput_fraction"], errors,
    ]  # fmt: skip


def rate_text(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def knee_lines(knees: dict[int, Knee | None], rates: Sequence[float]) -> list[str]:
    lowest, highest = rate_text(min(rates)), rate_text(max(rates))
    lines = [
        f"The knee: the lowest offered rate at which p50 e2e > {KNEE_LATENCY_FACTOR:g}x its value at "
        f"{lowest} req/s, or achieved < {KNEE_SATURATION_FRACTION:.0%} of the arrivals' rate."
    ]
    for users, knee in knees.items():
        if knee is None:
            lines.append(f"- {users} users: none up to {highest} req/s")
        elif knee.reason == "latency":
            lines.append(
                f"- {users} users: {rate_text(knee.rate)} req/s "
                f"(p50 e2e {knee.e2e_ratio:.1f}x the {lowest} req/s value)"
            )
        else:
            lines.append(
                f"- {users} users: {rate_text(knee.rate)} req/s "
                f"(saturated: achieved {knee.achieved_fraction:.1%} of the arrivals' rate)"
            )
    return lines


LATENCY_LINES = (  # summary key, name, percentile, line style
    ("ttft_ms", "TTFT", "p50", "-o"), ("ttft_ms", "TTFT", "p99", "--^"), ("e2e_ms", "e2e", "p50", ":s"),
)  # fmt: skip


def plot(cells: Sequence[CellResult], knees: dict[int, Knee | None], path: str) -> None:
    plt = serving.pyplot()
    rates = sorted({c.offered_rate for c in cells})
    finite = [r for r in rates if math.isfinite(r)]
    inf_x = 2 * max(finite) if finite else 1.0  # where `inf` sits on the log axis

    def x(rate: float) -> float:
        return inf_x if math.isinf(rate) else rate

    fig, (lat, good) = plt.subplots(1, 2, figsize=(13, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, users in enumerate(dict.fromkeys(c.users for c in cells)):
        mine = sorted((c for c in cells if c.users == users), key=lambda c: c.offered_rate)
        xs, colour = [x(c.offered_rate) for c in mine], colours[i % len(colours)]
        for key, name, q, style in LATENCY_LINES:
            label = f"{users} users, {name} {q}"
            lat.plot(xs, [c.summary[key][q] for c in mine], style, color=colour, label=label, markersize=4)
        good.plot(xs, [c.summary["goodput"] for c in mine], "-o", color=colour, label=f"{users} users")
        knee = knees.get(users)
        if knee is not None:
            lat.axvline(x(knee.rate), color=colour, alpha=0.25, linewidth=3)
    good.plot(finite, finite, ":", color="grey", label="offered")
    for ax in (lat, good):
        ax.set_xscale("log")
        ax.set_xticks([x(r) for r in rates], [rate_text(r) for r in rates])
        ax.minorticks_off()
        ax.set_xlabel("offered load (requests/s)")
        ax.grid(True, alpha=0.3)
    lat.set_yscale("log")
    lat.set_ylabel("latency (ms)")
    lat.set_title("TTFT p50 (solid), TTFT p99 (dashed), e2e p50 (dotted); knees shaded")
    lat.legend(fontsize=6, ncol=2)
    good.set_ylabel("goodput (requests/s within both SLOs)")
    good.set_title("goodput")
    good.legend(fontsize=8)
    serving.save_figure(fig, path)


# --- the run ---


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serving.add_common_args(parser)
    parser.add_argument(
        "--concurrent_users", type=parse_users, default=parse_users("1,5,10,20,32"),
        help="pool sizes: at most this many requests in flight (comma list, default 1,5,10,20,32)",
    )  # fmt: skip
    parser.add_argument(
        "--request_rate", type=parse_rates, default=parse_rates("1,5,10,20"),
        help="offered loads in requests/s, Poisson arrivals; inf: all at once (default 1,5,10,20)",
    )  # fmt: skip
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per cell (60)")
    parser.add_argument("--prompt_len", type=int, default=256, help="prompt tokens (default 256)")
    parser.add_argument("--output_len", type=int, default=128, help="output tokens (default 128)")
    parser.add_argument(
        "--burst_requests", type=int, default=0,
        help="requests of an inf-rate cell, all sent at once (default 10 x users)",
    )  # fmt: skip
    parser.add_argument("--slo-ttft-ms", type=float, default=1000.0, help="goodput's TTFT SLO (1000)")
    parser.add_argument("--slo-itl-ms", type=float, default=100.0, help="goodput's mean ITL SLO (100)")
    parser.add_argument(
        "--drain", type=float, default=120.0,
        help="at most this many seconds for in-flight requests after the arrivals stop (120)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.prompt_len < 1 or args.output_len < 1 or args.drain < 0:
        parser.error("--duration, --prompt_len and --output_len must be positive, --drain not negative")
    return args


def make_requests(target: Target, seed: int) -> Take:
    """`take(n, tokens)`: the next n prompts of one generator, seeded once for the whole run."""
    from prompts import PromptGenerator, tokenizer_functions

    encode, decode = tokenizer_functions(target.model_dir)
    generator = PromptGenerator(encode, decode, seed)

    def take(n: int, tokens: int) -> list[Request]:
        return [Request(p.text, p.tokens) for p in generator.prompts(n, tokens)]

    return take


async def measure_cell(
    client: Client, args: argparse.Namespace, take: Take, users: int, rate: float
) -> CellResult:
    """One cell of the grid: its arrivals, prompts, run and numbers (a line on stderr as it ends)."""
    rng = random.Random(derived_seed(args.seed, "arrivals", rate))
    arrivals = arrival_times(rate, args.duration, rng, args.burst_requests or 10 * users)
    requests = take(len(arrivals), args.prompt_len)
    bar = serving.progress(len(arrivals), f"{users} users, {rate_text(rate)} req/s", "req")
    window = 0.0 if math.isinf(rate) else args.duration
    try:
        run = await run_cell(
            client, requests, arrivals, users, args.output_len, args.drain, window,
            on_done=lambda _: bar.update(1),
        )  # fmt: skip
    finally:
        bar.close()
    cell = cell_result(users, rate, arrivals, run, args.slo_ttft_ms / 1000, args.slo_itl_ms / 1000)
    s = cell.summary
    print(
        f"{users} users, {rate_text(rate)} req/s: {cell.arrivals} requests, achieved "
        f"{cell.achieved_rate:.2f} req/s, TTFT p50 {s['ttft_ms']['p50']:.0f} ms, e2e p50 "
        f"{s['e2e_ms']['p50']:.0f} ms, {sum(s['errors'].values())} errors",
        file=sys.stderr,
    )
    return cell


async def run_grid(args: argparse.Namespace, target: Target) -> list[CellResult]:
    """Every users x rate cell in turn on one client, after one uncounted warm-up request."""
    take = make_requests(target, args.seed)
    async with serving.clients(target) as client:
        warm = take(1, args.prompt_len)[0]
        warm_up = await client.send(warm.text, warm.tokens, args.output_len, 0.0)
        if not warm_up.ok:
            print(f"warning: the warm-up request failed ({warm_up.error})", file=sys.stderr)
        return [
            await measure_cell(client, args, take, users, rate)
            for users in args.concurrent_users
            for rate in args.request_rate
        ]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with serving.open_target(args) as target:
        cells = asyncio.run(run_grid(args, target))
    knees = find_knees([c.point for c in cells])
    print(serving.markdown_table(HEADERS, [table_row(c) for c in cells]))
    print("\n".join(["", *knee_lines(knees, args.request_rate)]))
    serving.write_json(
        args.json,
        {
            "params": {k: v for k, v in vars(args).items() if k not in ("api_key", "json", "plot")},
            "machine": serving.machine(),
            "target": target.name,
            "cells": [asdict(c) for c in cells],
            "knees": {str(u): asdict(k) if k else None for u, k in knees.items()},
        },
    )
    if args.plot:
        plot(cells, knees, args.plot)
    failed = sum(n for c in cells for code, n in c.summary["errors"].items() if code != DRAIN_ERROR)
    abandoned = sum(c.summary["errors"].get(DRAIN_ERROR, 0) for c in cells)
    if abandoned:
        print(f"{abandoned} request(s) abandoned after --drain (overloaded cells)", file=sys.stderr)
    if failed:
        print(f"{failed} request(s) failed", file=sys.stderr)
    return EXIT_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
