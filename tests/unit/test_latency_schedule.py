"""benchmark/latency_test.py without a server: the Poisson arrival schedule, the knee rule on
handmade cells, and the capped-concurrency runner driven by a fake client (short real sleeps)."""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmark"))
import latency_test as lt
from serving import RequestRecord

# --- arrivals ---


def test_arrivals_are_poisson_with_the_right_mean_gap() -> None:
    rate = 20.0
    times = lt.arrival_times(rate, 1000.0, random.Random(7))
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert len(times) == pytest.approx(rate * 1000, rel=0.03)
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.03)
    # Exponential: the standard deviation equals the mean, and P(gap > mean) = 1/e.
    assert statistics.pstdev(gaps) == pytest.approx(1 / rate, rel=0.05)
    assert sum(g > 1 / rate for g in gaps) / len(gaps) == pytest.approx(math.exp(-1), abs=0.02)
    assert times == sorted(times) and times[0] > 0 and times[-1] < 1000.0


def test_arrivals_are_deterministic_per_seed() -> None:
    def draw(seed: int) -> list[float]:
        return lt.arrival_times(5.0, 30.0, random.Random(lt.derived_seed(seed, "arrivals", 5.0)))

    assert draw(0) == draw(0)
    assert draw(0) != draw(1)
    assert lt.derived_seed(0, "arrivals", 5.0) == lt.derived_seed(0, "arrivals", 5.0)
    assert lt.derived_seed(0, "arrivals", 5.0) != lt.derived_seed(0, "arrivals", 10.0)


def test_an_infinite_rate_sends_everything_at_once() -> None:
    assert lt.arrival_times(math.inf, 60.0, random.Random(0), burst=12) == [0.0] * 12


def test_rate_and_users_lists() -> None:
    assert lt.parse_rates("1,5,inf") == [1.0, 5.0, math.inf]
    assert lt.parse_users("1,5,10,20,32") == [1, 5, 10, 20, 32]
    for bad in ("0", "-1", "x", "nan", ""):
        with pytest.raises(Exception, match="expected"):
            lt.parse_rates(bad)
    with pytest.raises(Exception, match="expected"):
        lt.parse_users("0,4")


def test_the_guides_command_parses() -> None:
    args = lt.parse_args(["--concurrent_users", "1,5,10,20,32", "--request_rate", "1,5,10,20"])
    assert args.concurrent_users == [1, 5, 10, 20, 32] and args.request_rate == [1, 5, 10, 20]
    assert (args.duration, args.prompt_len, args.output_len, args.drain) == (60, 256, 128, 120)
    assert (args.slo_ttft_ms, args.slo_itl_ms) == (1000, 100)


def test_event_rate() -> None:
    assert lt.event_rate([0.0, 1.0, 2.0, 3.0]) == 1.0
    assert lt.event_rate([5.0, 5.5]) == 2.0
    assert math.isnan(lt.event_rate([1.0]))
    assert lt.event_rate([0.0, 0.0, 0.0]) == math.inf


def test_achieved_rate_follows_the_arrivals_despite_latency_noise() -> None:
    rng = random.Random(3)
    sent = lt.arrival_times(1.0, 20.0, rng)
    # Latency from 0.5 to 6 s at random: first/last completions would be far off, the slope is not.
    done = [t + rng.uniform(0.5, 6.0) for t in sent]
    arrived = lt.event_rate(sent)
    assert lt.achieved_rate(arrived, sent, done) == pytest.approx(arrived, rel=0.1)
    assert lt.achieved_rate(arrived, sent, [t + 2.0 for t in sent]) == pytest.approx(arrived)


def test_achieved_rate_is_the_sustained_rate_when_a_queue_builds() -> None:
    sent = [0.1 * i for i in range(50)]  # 10 req/s offered ...
    done = [0.2 * (i + 1) for i in range(50)]  # ... served one at a time, 0.2 s each: 5 req/s
    assert lt.achieved_rate(lt.event_rate(sent), sent, done) == pytest.approx(5.0)
    # All at once (no slope): the completions' own rate; too few points: unknown.
    assert lt.achieved_rate(math.inf, [0.0] * 4, [1.0, 2.0, 3.0, 4.0]) == pytest.approx(1.0)
    assert math.isnan(lt.achieved_rate(1.0, [0.0], [1.0]))
    assert lt.slope([0.0, 1.0, 2.0], [1.0, 3.0, 5.0]) == pytest.approx(2.0)


# --- the knee ---


def point(
    rate: float, e2e: float, achieved: float | None = None, arrived: float | None = None
) -> lt.CellPoint:
    arrived = rate if arrived is None else arrived
    return lt.CellPoint(4, rate, arrived, arrived if achieved is None else achieved, e2e)


def test_the_knee_is_where_p50_e2e_doubles() -> None:
    points = [point(1, 100), point(5, 150), point(10, 200), point(20, 201), point(40, 900)]
    knee = lt.find_knee(points)
    assert knee is not None and knee.rate == 20 and knee.reason == "latency"
    assert knee.e2e_ratio == pytest.approx(2.01)
    # Exactly twice is not past it; the order the cells come in does not matter.
    assert lt.find_knee(list(reversed(points[:3]))) is None  # 200 ms: exactly 2x


def test_the_knee_is_where_the_achieved_rate_falls_behind() -> None:
    points = [point(1, 100), point(5, 110, achieved=4.6), point(10, 120, achieved=8.9), point(20, 300)]
    knee = lt.find_knee(points)
    assert knee is not None and (knee.rate, knee.reason) == (10, "saturation")
    assert knee.achieved_fraction == pytest.approx(0.89)
    # Judged against the arrivals' measured rate: a short run that drew fewer arrivals is not saturated.
    assert lt.find_knee([point(1, 100), point(10, 110, achieved=7.5, arrived=8.0)]) is None
    # Saturated already at the lowest rate; nothing completed counts as saturated.
    assert lt.find_knee([point(1, 100, achieved=0.5), point(2, 100)]).rate == 1  # type: ignore[union-attr]
    assert lt.find_knee([point(1, 100), point(2, math.nan, achieved=0.0)]).rate == 2  # type: ignore[union-attr]


def test_no_knee_and_unknowns() -> None:
    assert lt.find_knee([point(1, 100), point(5, 120), point(10, 199)]) is None
    assert lt.find_knee([]) is None
    # Unknown achieved rates and latencies decide nothing; the baseline is the lowest known.
    assert lt.find_knee([point(1, math.nan), point(2, 100, achieved=math.nan), point(4, 150)]) is None
    knee = lt.find_knee([point(1, math.nan), point(2, 100), point(4, 250)])
    assert knee is not None and knee.rate == 4
    # An inf cell: its arrivals' rate is infinite, anything achieved is 0 % of it.
    inf = lt.CellPoint(4, math.inf, math.inf, 30.0, 120)
    knee = lt.find_knee([point(1, 100), point(10, 110), inf])
    assert knee is not None and knee.rate == math.inf and knee.reason == "saturation"


def test_knees_per_users() -> None:
    cells = [
        lt.CellPoint(1, 1, 1, 1, 100), lt.CellPoint(1, 5, 5, 2, 400),
        lt.CellPoint(8, 1, 1, 1, 100), lt.CellPoint(8, 5, 5, 5, 120),
    ]  # fmt: skip
    knees = lt.find_knees(cells)
    assert list(knees) == [1, 8]
    assert knees[1] is not None and knees[1].rate == 5 and knees[1].reason == "latency"
    assert knees[8] is None
    lines = lt.knee_lines(knees, [1, 5])
    assert "- 1 users: 5 req/s (p50 e2e 4.0x the 1 req/s value)" in lines
    assert "- 8 users: none up to 5 req/s" in lines


# --- the runner ---


class FakeClient:
    """Answers after `service_s`, reporting a TTFT of `ttft_s` from when it was called; counts
    what is in flight."""

    def __init__(self, service_s: float, ttft_s: float = 0.005, fail: set[int] | None = None) -> None:
        self.service_s, self.ttft_s = service_s, ttft_s
        self.fail = fail or set()
        self.in_flight = self.peak = self.calls = 0
        self.started: list[float] = []

    async def send(self, prompt: str, prompt_tokens: int, max_tokens: int, sent: float) -> RequestRecord:
        index = self.calls
        self.calls += 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self.started.append(time.perf_counter())
        try:
            await asyncio.sleep(self.service_s)
        finally:
            self.in_flight -= 1
        if index in self.fail:
            return RequestRecord(sent, prompt_tokens, max_tokens, e2e=self.service_s, error="UNAVAILABLE")
        record = RequestRecord(sent, prompt_tokens, max_tokens, ttft=self.ttft_s, e2e=self.service_s)
        record.itl, record.output_tokens = [0.001] * (max_tokens - 1), max_tokens
        return record

    async def close(self) -> None:
        pass


def requests(n: int) -> list[lt.Request]:
    return [lt.Request(f"prompt {i}", 8) for i in range(n)]


async def test_at_most_users_in_flight_and_the_wait_counts() -> None:
    client = FakeClient(service_s=0.04)
    done: list[RequestRecord] = []
    run = await lt.run_cell(
        client, requests(6), [0.0] * 6, users=2, max_tokens=4, drain_s=5, on_done=done.append
    )
    assert client.peak == 2 and client.calls == 6 and len(done) == 6
    assert [r.sent for r in run.records] == [0.0] * 6
    # Pairs go at 0, 40 and 80 ms: the 3rd..6th waited for a user, and it shows in TTFT and e2e.
    for i, record in enumerate(run.records):
        queued = 0.04 * (i // 2)
        assert record.ok and record.output_tokens == 4 and record.itl == [0.001] * 3
        assert record.ttft is not None and record.ttft >= 0.005 + queued - 0.003
        assert record.e2e is not None and record.e2e >= 0.04 + queued - 0.003
        assert record.e2e - record.ttft == pytest.approx(0.035, abs=1e-9)  # the wait moves both
    assert sorted(run.queue_waits)[2] >= 0.04 - 0.003 and sorted(run.queue_waits)[4] >= 0.08 - 0.003
    assert run.wall_s >= 0.12 - 0.003


async def test_arrivals_are_spread_and_unqueued_when_users_suffice() -> None:
    client = FakeClient(service_s=0.01)
    arrivals = [0.0, 0.03, 0.06]
    started = time.perf_counter()
    run = await lt.run_cell(client, requests(3), arrivals, users=4, max_tokens=2, drain_s=5)
    for offset, at in zip(arrivals, client.started, strict=True):
        assert at - started >= offset - 0.002  # not sent before its arrival
    assert client.peak == 1 and max(run.queue_waits) < 0.02
    assert [r.sent for r in run.records] == arrivals


async def test_the_drain_cancels_what_still_runs() -> None:
    client = FakeClient(service_s=0.3)
    run = await lt.run_cell(client, requests(3), [0.0] * 3, users=1, max_tokens=2, drain_s=0.05)
    assert run.records[0].error == lt.DRAIN_ERROR  # cancelled in flight
    assert [r.error for r in run.records[1:]] == [lt.DRAIN_ERROR] * 2  # never got a user
    assert client.in_flight == 0 and run.wall_s < 0.25


async def test_a_cells_numbers() -> None:
    client = FakeClient(service_s=0.02, fail={1})
    arrivals = [0.0, 0.01, 0.02, 0.03]
    run = await lt.run_cell(client, requests(4), arrivals, users=4, max_tokens=3, drain_s=5)
    cell = lt.cell_result(4, 100.0, arrivals, run, slo_ttft_s=1.0, slo_itl_s=0.1)
    assert cell.arrivals == 4 and cell.arrival_rate == pytest.approx(100.0)
    assert cell.summary["completed"] == 3 and cell.summary["errors"] == {"UNAVAILABLE": 1}
    assert 0 < cell.achieved_rate < math.inf and cell.summary["good_requests"] == 3
    row = lt.table_row(cell)
    assert len(row) == len(lt.HEADERS) and row[-1] == "UNAVAILABLE 1"
    assert cell.point.e2e_p50_ms == cell.summary["e2e_ms"]["p50"]


class RaisingClient(FakeClient):
    async def send(self, prompt: str, prompt_tokens: int, max_tokens: int, sent: float) -> RequestRecord:
        raise RuntimeError("a client bug")


async def test_a_client_exception_is_an_error_not_a_crash() -> None:
    run = await lt.run_cell(RaisingClient(0.0), requests(2), [0.0, 0.0], users=1, max_tokens=2, drain_s=5)
    assert [r.error for r in run.records] == [lt.CLIENT_ERROR] * 2


def test_the_plot_handles_an_infinite_rate(tmp_path: Path) -> None:
    def cell(users: int, rate: float, e2e: float) -> lt.CellResult:
        latency = {"mean": e2e, "p50": e2e, "p95": e2e, "p99": e2e}
        summary = {"ttft_ms": latency, "e2e_ms": latency, "goodput": min(rate, 5.0)}
        return lt.CellResult(users, rate, 10, rate, rate, latency, summary)

    cells = [cell(u, r, e) for u in (1, 4) for r, e in ((1.0, 100.0), (5.0, 150.0), (math.inf, math.nan))]
    lt.plot(cells, lt.find_knees([c.point for c in cells]), str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
