"""Serving throughput: a closed-loop load of `batch` concurrent clients per cell, over a grid of
batch sizes and prompt lengths, against a WiCore gateway.

    python benchmark/throughput_test.py --batch_sizes 1,4,8,16 --sequence_lengths 128,512,1024,2048 \\
        --duration 300 [--output_len 128] [--warmup S] [--compare hf] [--json OUT] [--plot OUT.png]
        [--target HOST:PORT | --http URL] [--model smollm2|DIR] [--set section.key=value ...]

Without `--target`/`--http` the script starts a stack itself (`wicore up`, `--workers`, `--set`)
serving `--model`, and stops it at the end (see benchmark/serving.py for the target options).

One cell (batch size B, sequence length L): exactly B client tasks, each sending a streamed request
of an L-token prompt for exactly `--output_len` new tokens (greedy, ignore_eos), waiting for it to
end, then sending the next, until the cell's `--duration` seconds are up. Every request has its own
prompt of exactly L tokens in the served model's tokenizer: a short tag unique to the run, cell and
request ("4821.17\n", for L >= 16), then real text from the bundled corpus (benchmark/prompts.py)
drawn with a seed derived from `--seed`, B and L. The tag makes every prompt's first KV block new
to the server, so nothing is served from its prefix cache, not even across cells or runs.

What is counted. The first `--warmup` seconds of a cell are not counted; the measured window is
[warmup, duration]. A request counts when it *completes* inside that window (vLLM's convention):
all its prompt and output tokens count then. Requests still in flight at the deadline are left
to finish (nothing new is sent) and are not counted; requests that began during warm-up and end
inside the window are. In a steady closed loop both edges carry about the same work, so
tokens / window estimates the steady rate; the window should last many request lifetimes
(short ones such as `--duration 3` work, with more noise).

How to read the table (one row per cell, also in --json with every other number):
  output tok/s   generated tokens of the counted requests / window seconds: the serving rate
  total tok/s    (prompt + generated tokens) / window seconds: the work done, prefill included
  TTFT p50/p95   time to first token, milliseconds; grows with L (prefill) and with B (queueing)
  ITL p50        time between streamed token messages of one request, milliseconds
  util %         mean GPU utilisation (NVML) over the window when a GPU is visible and the target
                 is local; otherwise the worker processes' CPU time / (window x this machine's
                 cores) (known for a stack started here, or with --metrics); '-' when unknown
  vs HF static   (--compare hf) WiCore's output tok/s / transformers' static batched `generate`
  vs HF CB       (--compare hf) WiCore's output tok/s / transformers' continuous batching
                 (`generate_batch`)
A ratio above 1 means WiCore served more tokens per second. The HF baselines run in this process,
after the WiCore cells (the stack started here is stopped first), on the local copy of `--model`
(fp32, greedy, as WiCore runs on CPU by default): for each cell one batch of the cell's first B
prompts (the same token ids WiCore's first wave got), all at once, `--output_len` tokens each.

Exit status: 0 when every request succeeded; 1 if any failed (the errors are printed by gRPC code);
2 if the target does not answer.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prompts
import serving

HF_BLOCK_SIZE = 16  # transformers' continuous batching page size: WiCore's default worker.block_size
RECORDS_PER_CELL_IN_JSON = 1000  # per-request records go into --json for cells with at most this many
ERROR_PAUSE_S = 0.1  # a client whose request failed waits this long before the next (no busy loop)
MIN_TAGGED_TOKENS = 16  # shorter prompts go untagged (a tag takes up to about 8 tokens)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Params:
    output_len: int
    duration_s: float
    warmup_s: float


@dataclass(frozen=True)
class Cell:
    batch: int  # concurrent clients
    prompt_tokens: int  # the sequence length: tokens of every prompt
    seed: int  # of this cell's prompts


@dataclass
class Utilisation:
    gpu: float | None = None  # mean NVML utilisation (0-1), when a local GPU is watched
    cpu: float | None = None  # the workers' share of this machine's cores (0-1), when known

    @property
    def shown(self) -> float | None:
        """What the table's util % shows: the GPU's when measured, else the workers' CPU."""
        return self.gpu if self.gpu is not None else self.cpu


@dataclass(frozen=True)
class HfResult:
    """One transformers baseline on one cell's batch."""

    tok_s: float
    ttft_p50_ms: float


@dataclass
class CellResult:
    cell: Cell
    records: list[serving.RequestRecord]  # every request of the cell, warm-up and drain included
    counted: list[serving.RequestRecord]  # those that completed inside the measured window
    summary: dict[str, Any]  # serving.summarize over `counted` and the window
    utilisation: Utilisation
    first_prompts: list[prompts.Prompt]  # the first wave: also the HF baselines' batch
    hf: dict[str, HfResult] = field(default_factory=dict)  # "static" / "cb" -> tok/s, TTFT

    @property
    def errors(self) -> dict[str, int]:
        """Failed requests by gRPC code over the whole cell (warm-up and drain included)."""
        out: dict[str, int] = {}
        for record in self.records:
            if record.error is not None:
                out[record.error] = out.get(record.error, 0) + 1
        return out

    def hf_ratio(self, mode: str) -> float | None:
        baseline = self.hf.get(mode)
        if baseline is None or baseline.tok_s <= 0:
            return None
        return float(self.summary["output_tok_s"]) / baseline.tok_s


# --- the command line ---


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of positive integers, e.g. '1,4,8,16'."""
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    serving.add_common_args(parser)
    parser.add_argument(
        "--batch_sizes",
        type=positive_ints,
        default=[1, 4, 8, 16],
        help="concurrent clients per cell (default 1,4,8,16)",
    )
    parser.add_argument(
        "--sequence_lengths",
        type=positive_ints,
        default=[128, 512, 1024, 2048],
        help="prompt lengths in tokens (default 128,512,1024,2048)",
    )
    parser.add_argument("--duration", type=float, default=300.0, help="seconds per cell (default 300)")
    parser.add_argument("--output_len", type=int, default=128, help="new tokens per request (default 128)")
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds of each cell not counted (default min(10, duration/5))",
    )
    parser.add_argument(
        "--compare", choices=("none", "hf"), default="none", help="hf: also run transformers' baselines"
    )
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(10.0, args.duration / 5)
    if args.duration <= 0:
        parser.error("--duration must be positive")
    if not 0 <= args.warmup < args.duration:
        parser.error("--warmup must be at least 0 and less than --duration")
    if args.output_len < 1:
        parser.error("--output_len must be at least 1")
    return args


def cell_seed(seed: int, batch: int, prompt_tokens: int) -> int:
    """The prompts' seed of one cell: fixed by --seed and the cell, whatever else is in the grid."""
    return random.Random(f"{seed}/{batch}/{prompt_tokens}").randrange(2**32)


def hf_block_size(args: argparse.Namespace) -> int:
    """The page size of transformers' continuous batching: the stack's worker.block_size."""
    return int(serving.parse_settings(args.set).get("worker.block_size", HF_BLOCK_SIZE))


def make_cells(args: argparse.Namespace) -> list[Cell]:
    return [
        Cell(batch, length, cell_seed(args.seed, batch, length))
        for length in args.sequence_lengths
        for batch in args.batch_sizes
    ]


# --- one cell ---


class PromptSupply:
    """One cell's prompts, each made for one request: `tokens` tokens of seeded corpus text that
    open with a tag unique to this run's cell and the request ("4821.17\n", counted in the
    tokens), so no prompt starts like one the server saw before, in this cell, an earlier one or
    an earlier run: nothing is served from the prefix cache. The first wave is made up front; the
    rest in a thread (a long prompt takes milliseconds to fit; the event loop keeps timing)."""

    def __init__(self, generator: prompts.PromptGenerator, tokens: int, cell_tag: int) -> None:
        self.generator = generator
        self.tokens = tokens
        self.cell_tag = cell_tag
        self.made = 0
        self.waiting: list[prompts.Prompt] = []
        self._lock = threading.Lock()  # the generator's state is not for concurrent calls

    def make_first(self, n: int) -> list[prompts.Prompt]:
        """The first `n` prompts, handed out by `next` before any new one."""
        self.waiting = [self.make() for _ in range(n)]
        return list(self.waiting)

    async def next(self) -> prompts.Prompt:
        if self.waiting:
            return self.waiting.pop(0)
        return await asyncio.to_thread(self.make)

    def make(self) -> prompts.Prompt:
        with self._lock:
            self.made += 1
            tag = f"{self.cell_tag}.{self.made}\n" if self.tokens >= MIN_TAGGED_TOKENS else None
            return self.generator.prompt(self.tokens, tag)


async def client_loop(
    client: serving.Client,
    supply: PromptSupply,
    output_len: int,
    clock: Callable[[], float],
    deadline: float,
    records: list[serving.RequestRecord],
) -> None:
    """One closed-loop client: send, wait for the end, send the next, until `deadline`."""
    while clock() < deadline:
        prompt = await supply.next()
        record = await client.send(prompt.text, prompt.tokens, output_len, clock())
        records.append(record)
        if record.error is not None:
            await asyncio.sleep(ERROR_PAUSE_S)


def completed_in(
    records: Sequence[serving.RequestRecord], start: float, end: float
) -> list[serving.RequestRecord]:
    """The requests (failed ones too) that ended within [start, end] (seconds on the cell's clock)."""
    return [r for r in records if r.e2e is not None and start <= r.sent + r.e2e <= end]


def is_local(target: serving.Target) -> bool:
    """Whether the target's processes run on this machine (so this machine's GPU is theirs)."""
    if target.pids:
        return True
    address = target.name.split()[0]
    host = urllib.parse.urlsplit(address if "://" in address else f"grpc://{address}").hostname
    return host in LOCAL_HOSTS


async def advance(bar: Any, clock: Callable[[], float], until: float) -> None:
    """Moves the progress bar with the cell's clock until `until` seconds."""
    shown = 0.0
    while shown < until:
        await asyncio.sleep(0.5)
        now = min(clock(), until)
        bar.update(now - shown)
        shown = now


async def measure_window(
    target: serving.Target, gpu: serving.GpuMeter, clock: Callable[[], float], params: Params
) -> Utilisation:
    """Waits out warm-up, watches the resources over the window, returns their utilisation."""
    cpu = serving.CpuMeter(target)
    watch_gpu = gpu.available and is_local(target)
    await asyncio.sleep(max(0.0, params.warmup_s - clock()))
    await asyncio.to_thread(cpu.start)  # /proc, or a remote /metrics: off the event loop
    if watch_gpu:
        gpu.start()
    await asyncio.sleep(max(0.0, params.duration_s - clock()))
    used = Utilisation(cpu=await asyncio.to_thread(cpu.stop))
    if watch_gpu:
        used.gpu = await gpu.stop()
    return used


async def run_cell(
    target: serving.Target,
    generator: prompts.PromptGenerator,
    cell: Cell,
    params: Params,
    gpu: serving.GpuMeter,
    bar: Any,
) -> CellResult:
    supply = PromptSupply(generator, cell.prompt_tokens, random.SystemRandom().randrange(10_000))
    first = supply.make_first(cell.batch)
    records: list[serving.RequestRecord] = []
    async with serving.clients(target) as client:
        start = time.perf_counter()

        def clock() -> float:
            return time.perf_counter() - start

        loops = [
            asyncio.create_task(
                client_loop(client, supply, params.output_len, clock, params.duration_s, records)
            )
            for _ in range(cell.batch)
        ]
        progress = asyncio.create_task(advance(bar, clock, params.duration_s))
        utilisation = await measure_window(target, gpu, clock, params)
        await progress
        bar.set_postfix_str(f"B={cell.batch} L={cell.prompt_tokens}: draining")
        await asyncio.gather(*loops)  # in flight at the deadline: they finish, uncounted
    window_s = params.duration_s - params.warmup_s
    counted = completed_in(records, params.warmup_s, params.duration_s)
    summary = serving.summarize(counted, window_s)
    return CellResult(cell, records, counted, summary, utilisation, first)


async def run_cells(
    target: serving.Target,
    cells: Sequence[Cell],
    params: Params,
    encode: prompts.Encode,
    decode: prompts.Decode,
) -> list[CellResult]:
    gpu = serving.GpuMeter()
    bar = serving.progress(len(cells) * params.duration_s, "throughput")
    bar.bar_format = "{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]"
    results = []
    try:
        for cell in cells:
            bar.set_postfix_str(f"B={cell.batch} L={cell.prompt_tokens}")
            generator = prompts.PromptGenerator(encode, decode, cell.seed)
            result = await run_cell(target, generator, cell, params, gpu, bar)
            results.append(result)
            bar.write(cell_line(result), file=sys.stderr)
    finally:
        bar.close()
    return results


def cell_line(result: CellResult) -> str:
    s = result.summary
    errors = result.errors
    return (
        f"batch {result.cell.batch:>3} x {result.cell.prompt_tokens:>5} tokens: "
        f"{s['completed']} requests counted, {s['output_tok_s']:.1f} output tok/s, "
        f"TTFT p50 {s['ttft_ms']['p50']:.0f} ms" + (f", errors {errors}" if errors else "")
    )


# --- transformers' baselines ---


def compare_hf(model_dir: Path, results: Sequence[CellResult], output_len: int, block_size: int) -> None:
    """Per cell: one batch of its first-wave prompts through transformers' static batched
    `generate` and its continuous batching; the tok/s of each into `result.hf`. The prompts are
    encoded as the gateway encodes them (`tokenizer.encode`, special tokens added)."""
    import engine_bench
    from transformers import AutoTokenizer

    print(f"transformers baselines on {model_dir}...", file=sys.stderr)
    model = engine_bench.load_hf(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    warm = [list(tokenizer.encode(results[0].first_prompts[0].text))[:16]]
    engine_bench.run_hf_static(model, tokenizer, warm, 2)  # warm-ups, not counted
    engine_bench.run_hf_generate_batch(model, warm, 2, block_size)
    for result in results:
        ids = [list(tokenizer.encode(p.text)) for p in result.first_prompts]
        static = engine_bench.run_hf_static(model, tokenizer, ids, output_len)
        cb = engine_bench.run_hf_generate_batch(model, ids, output_len, block_size)
        result.hf["static"] = HfResult(static.tok_s, static.ttft_p50_ms)
        result.hf["cb"] = HfResult(cb.tok_s, cb.ttft_p50_ms)
        print(
            f"HF batch {result.cell.batch:>3} x {result.cell.prompt_tokens:>5} tokens: "
            f"static {static.tok_s:.1f} tok/s, continuous batching {cb.tok_s:.1f} tok/s",
            file=sys.stderr,
        )


# --- reports ---


def table(results: Sequence[CellResult], compare: bool) -> str:
    headers = ["batch", "sequence length", "output tok/s", "total tok/s", "TTFT p50 ms", "TTFT p95 ms"]
    headers += ["ITL p50 ms", "util %"]
    if compare:
        headers += ["vs HF static", "vs HF CB"]
    rows = []
    for r in results:
        s = r.summary
        util = r.utilisation.shown
        util_percent = None if util is None else 100 * util
        row: list[Any] = [
            r.cell.batch, r.cell.prompt_tokens, s["output_tok_s"], s["total_tok_s"],
            s["ttft_ms"]["p50"], s["ttft_ms"]["p95"], s["itl_ms"]["p50"], util_percent,
        ]  # fmt: skip
        if compare:
            row += [r.hf_ratio("static"), r.hf_ratio("cb")]
        rows.append(row)
    return serving.markdown_table(headers, rows)


def utilisation_note(results: Sequence[CellResult]) -> str:
    if any(r.utilisation.gpu is not None for r in results):
        return "util %: mean GPU utilisation (NVML) over the window"
    if any(r.utilisation.cpu is not None for r in results):
        return "util %: the workers' CPU time / (window x this machine's cores)"
    return "util %: unknown (a remote target: give --metrics NAME=HOST:PORT for its workers)"


def report(
    args: argparse.Namespace, target: serving.Target, params: Params, results: Sequence[CellResult]
) -> dict[str, Any]:
    cells = []
    for r in results:
        cell: dict[str, Any] = {
            "batch": r.cell.batch,
            "sequence_length": r.cell.prompt_tokens,
            "seed": r.cell.seed,
            "window_s": params.duration_s - params.warmup_s,
            "requests_sent": len(r.records),
            "errors_all": r.errors,  # the whole cell, warm-up and drain included
            "utilisation": {"gpu": r.utilisation.gpu, "cpu": r.utilisation.cpu},
            **r.summary,  # the counted requests over the window
            "hf": {mode: vars(numbers) for mode, numbers in r.hf.items()},
            "vs_hf_static": r.hf_ratio("static"),
            "vs_hf_cb": r.hf_ratio("cb"),
        }
        if len(r.records) <= RECORDS_PER_CELL_IN_JSON:
            cell["records"] = r.records
        cells.append(cell)
    return {
        "benchmark": "throughput_test",
        "params": {k: v for k, v in vars(args).items() if k != "api_key"},  # no secret in a report
        "counting": "requests that completed inside [warmup, duration] of each cell",
        "machine": serving.machine(),
        "target": target.name,
        "model": args.model,
        "model_dir": target.model_dir,
        "cells": cells,
    }


def plot(results: Sequence[CellResult], path: str) -> None:
    """Output tok/s and TTFT p50 against batch size (log2), one line per sequence length."""
    plt = serving.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    lengths = sorted({r.cell.prompt_tokens for r in results})
    batches = sorted({r.cell.batch for r in results})
    for length in lengths:
        line = sorted((r for r in results if r.cell.prompt_tokens == length), key=lambda r: r.cell.batch)
        xs = [r.cell.batch for r in line]
        left.plot(xs, [r.summary["output_tok_s"] for r in line], marker="o", label=f"{length}")
        right.plot(xs, [r.summary["ttft_ms"]["p50"] for r in line], marker="o", label=f"{length}")
    for axes, ylabel in ((left, "output tokens/s"), (right, "TTFT p50 (ms)")):
        axes.set_xscale("log", base=2)
        axes.set_xticks(batches, [str(b) for b in batches])
        axes.set_xlabel("batch size (concurrent requests)")
        axes.set_ylabel(ylabel)
        axes.grid(True, alpha=0.3)
    left.legend(title="sequence length")
    left.set_title("output throughput")
    right.set_title("time to first token")
    serving.save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    params = Params(args.output_len, args.duration, args.warmup)
    cells = make_cells(args)
    with serving.open_target(args) as target:
        encode, decode = prompts.tokenizer_functions(target.model_dir)
        plan = f"{len(cells)} cells x {params.duration_s:g} s ({params.warmup_s:g} s warm-up)"
        print(f"{plan} against {target.name}", file=sys.stderr)
        results = asyncio.run(run_cells(target, cells, params, encode, decode))
    if args.compare == "hf":
        compare_hf(target.model_dir, results, args.output_len, hf_block_size(args))
    print(table(results, args.compare == "hf"))
    print(f"\n{utilisation_note(results)}; counted: requests completed in the last "
          f"{params.duration_s - params.warmup_s:g} s of each cell")  # fmt: skip
    serving.write_json(args.json, report(args, target, params, results))
    if args.plot:
        plot(results, args.plot)
    empty = [f"B={r.cell.batch} L={r.cell.prompt_tokens}" for r in results if r.summary["completed"] == 0]
    if empty:
        print(f"warning: no request ended inside the window of {', '.join(empty)}: lengthen --duration",
              file=sys.stderr)  # fmt: skip
    errors: dict[str, int] = {}
    for r in results:
        for code, count in r.errors.items():
            errors[code] = errors.get(code, 0) + count
    if errors:
        print(f"error: failed requests by code: {errors}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
