"""The serving benchmarks' statistics (benchmark/serving.py) and throughput_test.py's counting, on
scripted data and injected clocks: percentiles by hand and against numpy's linear method, the
latency summaries, `summarize` (throughput, errors by code, goodput against SLOs), the request
timer, the markdown table, and the closed loop's measured window."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from clocks import ManualClock

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmark"))
import serving
import throughput_test
from serving import RequestRecord

# --- percentile ---


@pytest.mark.parametrize(
    ("q", "expected"),
    [(0.0, 1.0), (0.25, 1.75), (0.5, 2.5), (0.95, 3.85), (0.99, 3.97), (1.0, 4.0)],
)
def test_percentile_interpolates_linearly_between_order_statistics(q: float, expected: float) -> None:
    # position q * (n - 1) into [1, 2, 3, 4]: 0.95 -> 2.85 -> 3 + 0.85 * (4 - 3)
    assert serving.percentile([4.0, 1.0, 3.0, 2.0], q) == pytest.approx(expected, abs=1e-12)


def test_percentile_of_one_value_and_of_none() -> None:
    assert serving.percentile([7.5], 0.0) == 7.5
    assert serving.percentile([7.5], 0.99) == 7.5
    assert math.isnan(serving.percentile([], 0.5))


def test_percentile_does_not_reorder_its_input() -> None:
    values = [3.0, 1.0, 2.0]
    serving.percentile(values, 0.5)
    assert values == [3.0, 1.0, 2.0]


def test_percentile_matches_numpy_linear_method_on_random_lists() -> None:
    rng = random.Random(11)
    for _ in range(200):
        values = [rng.expovariate(1.0) for _ in range(rng.randint(1, 60))]
        for q in (0.0, 0.01, 0.5, 0.9, 0.95, 0.99, 1.0, rng.random()):
            expected = float(np.percentile(values, 100 * q, method="linear"))
            assert serving.percentile(values, q) == pytest.approx(expected, rel=1e-12, abs=1e-12)


# --- latency_summary ---


def test_latency_summary_is_in_milliseconds() -> None:
    summary = serving.latency_summary([0.1, 0.2, 0.3, 0.4])
    assert set(summary) == {"mean", "p50", "p95", "p99"}
    assert summary["mean"] == pytest.approx(250.0)
    assert summary["p50"] == pytest.approx(250.0)
    assert summary["p95"] == pytest.approx(385.0)  # 1000 * (0.3 + 0.85 * 0.1)
    assert summary["p99"] == pytest.approx(397.0)  # 1000 * (0.3 + 0.97 * 0.1)


def test_latency_summary_names_the_quantiles_it_is_given() -> None:
    summary = serving.latency_summary([1.0, 2.0, 3.0], quantiles=(0.1, 0.9))
    assert set(summary) == {"mean", "p10", "p90"}
    assert summary["p10"] == pytest.approx(1200.0)
    assert summary["p90"] == pytest.approx(2800.0)


def test_latency_summary_of_nothing_is_nan() -> None:
    summary = serving.latency_summary([])
    assert all(math.isnan(v) for v in summary.values())


# --- summarize ---


def completed(
    ttft: float, itl: list[float], output: int, prompt: int = 10, sent: float = 0.0
) -> RequestRecord:
    e2e = ttft + sum(itl)
    return RequestRecord(sent, prompt, output, ttft=ttft, itl=itl, e2e=e2e, output_tokens=output)


def failed(code: str) -> RequestRecord:
    return RequestRecord(0.0, 10, 4, e2e=0.01, error=code)


def records() -> list[RequestRecord]:
    return [
        completed(0.100, [0.020, 0.030, 0.040], 4),  # good: TTFT 100 ms, mean ITL 30 ms
        completed(0.300, [0.020, 0.020, 0.020], 4),  # TTFT over the SLO
        completed(0.150, [0.050, 0.070, 0.060], 4),  # mean ITL 60 ms: over the SLO
        completed(0.200, [], 1),  # one token: no ITL, so only its TTFT is judged (good)
        failed("UNAVAILABLE"),
        failed("RESOURCE_EXHAUSTED"),
        failed("UNAVAILABLE"),
    ]


def test_summarize_counts_and_throughput_over_the_duration() -> None:
    summary = serving.summarize(records(), duration_s=2.0)
    assert summary["requests"] == 7
    assert summary["completed"] == 4
    assert summary["errors"] == {"UNAVAILABLE": 2, "RESOURCE_EXHAUSTED": 1}
    assert summary["duration_s"] == 2.0
    assert summary["request_throughput"] == pytest.approx(4 / 2.0)
    assert summary["output_tok_s"] == pytest.approx(13 / 2.0)  # 4 + 4 + 4 + 1, failed ones not
    assert summary["total_tok_s"] == pytest.approx((13 + 4 * 10) / 2.0)


def test_summarize_latencies_cover_completed_requests_only() -> None:
    summary = serving.summarize(records(), duration_s=2.0)
    assert summary["ttft_ms"]["p50"] == pytest.approx(175.0)  # 100, 150, 200, 300
    assert summary["ttft_ms"]["mean"] == pytest.approx(187.5)
    itls = [0.020, 0.030, 0.040, 0.020, 0.020, 0.020, 0.050, 0.070, 0.060]
    assert summary["itl_ms"]["mean"] == pytest.approx(1000 * sum(itls) / 9)
    assert summary["itl_ms"]["p50"] == pytest.approx(30.0)  # the 5th of 9 sorted
    assert summary["e2e_ms"]["p50"] == pytest.approx(265.0)  # 190, 200, 330, 360


def test_summarize_goodput_judges_ttft_and_mean_itl() -> None:
    summary = serving.summarize(records(), duration_s=2.0, slo_ttft_s=0.25, slo_itl_s=0.05)
    assert summary["good_requests"] == 2  # the first and the one-token request
    assert summary["goodput"] == pytest.approx(2 / 2.0)
    assert summary["goodput_fraction"] == pytest.approx(2 / 4)


def test_summarize_goodput_with_one_slo_or_none() -> None:
    only_ttft = serving.summarize(records(), duration_s=1.0, slo_ttft_s=0.25)
    assert only_ttft["good_requests"] == 3  # all but TTFT 300 ms
    only_itl = serving.summarize(records(), duration_s=1.0, slo_itl_s=0.05)
    assert only_itl["good_requests"] == 3  # all but mean ITL 60 ms
    no_slo = serving.summarize(records(), duration_s=1.0)
    assert no_slo["good_requests"] == 4
    assert no_slo["goodput_fraction"] == 1.0


def test_summarize_of_no_time_or_no_request_is_nan_not_an_error() -> None:
    zero = serving.summarize(records(), duration_s=0.0)
    assert math.isnan(zero["output_tok_s"]) and math.isnan(zero["request_throughput"])
    empty = serving.summarize([], duration_s=5.0)
    assert empty["requests"] == 0 and empty["output_tok_s"] == 0.0 and empty["errors"] == {}
    assert math.isnan(empty["goodput_fraction"]) and math.isnan(empty["ttft_ms"]["p50"])


# --- the request timer ---


def test_timer_marks_ttft_itls_and_end_to_end_exactly() -> None:
    clock = ManualClock(100.0)
    record = RequestRecord(sent=3.0, prompt_tokens=16, max_tokens=4)
    timer = serving.Timer(record, clock)
    clock.now = 100.125
    timer.tokens(0)  # a message without tokens: no mark
    clock.now = 100.25
    timer.tokens(1)
    clock.now = 100.375
    timer.tokens(2)  # one message, two tokens: one gap
    clock.now = 100.5
    timer.tokens(1)
    clock.now = 100.625
    assert timer.done() is record
    assert record.ttft == 0.25
    assert record.itl == [0.125, 0.125]
    assert record.mean_itl == 0.125
    assert record.e2e == 0.625
    assert record.output_tokens == 4
    assert record.ok and record.sent == 3.0


def test_timer_of_a_stream_without_tokens() -> None:
    clock = ManualClock(10.0)
    record = RequestRecord(sent=0.0, prompt_tokens=1, max_tokens=1)
    timer = serving.Timer(record, clock)
    clock.now = 10.5
    timer.done()
    assert record.ttft is None and record.itl == [] and record.mean_itl is None
    assert record.e2e == 0.5 and record.output_tokens == 0


# --- the markdown table ---


def test_markdown_table_formats_numbers_and_gaps() -> None:
    table = serving.markdown_table(
        ["batch", "tok/s", "ms", "util %", "ratio"],
        [[1, 1234.5678, 3.14159, None, math.nan], [16, 10.0, 0.5, 87.25, 0.0123]],
    )
    assert table.splitlines() == [
        "| batch | tok/s | ms | util % | ratio |",
        "|---:|---:|---:|---:|---:|",
        "| 1 | 1,234.6 | 3.14 | - | - |",
        "| 16 | 10.0 | 0.5 | 87.2 | 0.0123 |",
    ]


# --- throughput_test: the grid, the measured window, the closed loop ---


def test_comma_lists_parse_and_reject_nonsense() -> None:
    assert throughput_test.positive_ints("1,4,8,16") == [1, 4, 8, 16]
    assert throughput_test.positive_ints("128, 512,") == [128, 512]
    for bad in ("", "0", "4,-1", "a,b"):
        with pytest.raises(Exception, match="expected"):
            throughput_test.positive_ints(bad)


def test_the_guides_command_line_parses_with_the_documented_defaults() -> None:
    args = throughput_test.parse_args(
        ["--batch_sizes", "1,4,8,16", "--sequence_lengths", "128,512,1024,2048", "--duration", "300"]
    )
    assert args.batch_sizes == [1, 4, 8, 16] and args.sequence_lengths == [128, 512, 1024, 2048]
    assert args.duration == 300.0 and args.warmup == 10.0 and args.output_len == 128
    assert args.compare == "none" and args.model == "smollm2"
    assert throughput_test.parse_args(["--duration", "3"]).warmup == pytest.approx(0.6)
    with pytest.raises(SystemExit):
        throughput_test.parse_args(["--duration", "3", "--warmup", "3"])


def test_cell_seeds_depend_on_the_seed_and_the_cell_only() -> None:
    args = throughput_test.parse_args(["--batch_sizes", "1,4", "--sequence_lengths", "16,32"])
    cells = throughput_test.make_cells(args)
    assert [(c.batch, c.prompt_tokens) for c in cells] == [(1, 16), (4, 16), (1, 32), (4, 32)]
    assert len({c.seed for c in cells}) == 4
    fewer = throughput_test.make_cells(throughput_test.parse_args(["--batch_sizes", "4"]))
    assert throughput_test.cell_seed(0, 4, 128) == fewer[0].seed  # the grid does not move it
    assert throughput_test.cell_seed(1, 4, 128) != fewer[0].seed


def test_only_requests_completed_inside_the_window_count() -> None:
    def ending(sent: float, e2e: float, error: str | None = None) -> RequestRecord:
        return RequestRecord(sent, 8, 4, e2e=e2e, output_tokens=4, error=error)

    rows = [
        ending(0.0, 0.9),  # ends in warm-up
        ending(0.5, 0.5),  # ends exactly at the window's start: counts
        ending(0.8, 1.2),  # began in warm-up, ends inside: counts
        ending(2.0, 1.0),  # ends exactly at the deadline: counts
        ending(2.5, 1.0),  # in flight at the deadline: not counted
        ending(1.5, 0.1, error="UNAVAILABLE"),  # a failure inside the window: counted as one
    ]
    counted = throughput_test.completed_in(rows, 1.0, 3.0)
    assert counted == [rows[1], rows[2], rows[3], rows[5]]
    summary = serving.summarize(counted, 2.0)
    assert summary["output_tok_s"] == pytest.approx(12 / 2.0)
    assert summary["errors"] == {"UNAVAILABLE": 1}


class ScriptedClient:
    """Each request takes `seconds` on the injected clock and yields `tokens` tokens."""

    def __init__(self, clock: ManualClock, seconds: float, tokens: int) -> None:
        self.clock = clock
        self.seconds = seconds
        self.tokens = tokens
        self.prompts: list[str] = []

    async def send(self, prompt: str, prompt_tokens: int, max_tokens: int, sent: float) -> RequestRecord:
        self.prompts.append(prompt)
        self.clock.now += self.seconds
        return RequestRecord(
            sent, prompt_tokens, max_tokens, ttft=0.1, e2e=self.seconds, output_tokens=self.tokens
        )

    async def close(self) -> None:
        pass


class CountingGenerator:
    """A stand-in PromptGenerator: prompt i is its instruction (the tag) and 'p{i}'."""

    def __init__(self) -> None:
        self.made = 0

    def prompt(self, tokens: int, instruction: str | None = None) -> throughput_test.prompts.Prompt:
        self.made += 1
        return throughput_test.prompts.Prompt(f"{instruction or ''}p{self.made}", tokens)


async def test_a_closed_loop_client_sends_until_the_deadline_with_a_new_prompt_each_time() -> None:
    clock = ManualClock(0.0)
    client = ScriptedClient(clock, seconds=1.0, tokens=4)
    supply = throughput_test.PromptSupply(CountingGenerator(), 16, cell_tag=42)
    first = supply.make_first(1)
    assert [p.text for p in first] == ["42.1\np1"]
    rows: list[RequestRecord] = []
    await throughput_test.client_loop(client, supply, 4, clock, 3.5, rows)
    # sent at 0, 1, 2, 3 (each before the deadline); the last ends at 4, after it
    assert [r.sent for r in rows] == [0.0, 1.0, 2.0, 3.0]
    assert client.prompts == ["42.1\np1", "42.2\np2", "42.3\np3", "42.4\np4"]
    assert [r.prompt_tokens for r in rows] == [16] * 4 and [r.max_tokens for r in rows] == [4] * 4
    counted = throughput_test.completed_in(rows, 0.5, 3.5)
    assert [r.sent for r in counted] == [0.0, 1.0, 2.0]
    assert serving.summarize(counted, 3.0)["output_tok_s"] == pytest.approx(4.0)


def test_short_prompts_go_untagged() -> None:
    supply = throughput_test.PromptSupply(CountingGenerator(), 8, cell_tag=42)
    assert supply.make().text == "p1"


def test_the_table_has_the_guides_columns_and_the_hf_ratios() -> None:
    cell = throughput_test.Cell(batch=4, prompt_tokens=128, seed=1)
    summary = serving.summarize([completed(0.1, [0.02] * 3, 4, prompt=128)], 2.0)
    result = throughput_test.CellResult(
        cell, [], [], summary, throughput_test.Utilisation(cpu=0.5), first_prompts=[]
    )
    result.hf["static"] = throughput_test.HfResult(tok_s=1.0, ttft_p50_ms=50.0)
    result.hf["cb"] = throughput_test.HfResult(tok_s=4.0, ttft_p50_ms=50.0)
    plain = throughput_test.table([result], compare=False).splitlines()
    assert plain[0] == (
        "| batch | sequence length | output tok/s | total tok/s | TTFT p50 ms | TTFT p95 ms "
        "| ITL p50 ms | util % |"
    )
    assert plain[2] == "| 4 | 128 | 2 | 66.0 | 100.0 | 100.0 | 20.0 | 50.0 |"
    compared = throughput_test.table([result], compare=True).splitlines()
    assert compared[0].endswith("| util % | vs HF static | vs HF CB |")
    assert compared[2].endswith("| 50.0 | 2 | 0.5 |")  # 2 tok/s over 1 and over 4


def test_util_shows_the_gpu_when_measured_else_the_cpu() -> None:
    assert throughput_test.Utilisation(gpu=0.75, cpu=0.5).shown == 0.75
    assert throughput_test.Utilisation(cpu=0.5).shown == 0.5
    assert throughput_test.Utilisation().shown is None
