"""What observability costs: throughput with tracing (sample ratio 1.0, every span exported over
OTLP) and Prometheus metrics on (every /metrics scraped each second), against both off, in the
same run.

The spans go to an OTLP sink in a process of its own that takes each export and drops it
undecoded: the collector's own work (Jaeger's, elsewhere in a deployment) is not WiCore's
cost, while everything WiCore does to send them is counted.

- `stack_off` / `stack_on`: two `wicore up` stacks running side by side, the runs
  alternating between them; the same workload as engine_bench's stack mode (all requests
  at once, greedy, exactly --new-tokens each). `stack_on` sends its spans to the sink and
  is scraped every second.
- `engine_off` / `engine_on`: the worker's engine in-process behind its gRPC servicer's code
  path (WorkerServicer.Generate: engine timings, metrics, and with tracing the queue,
  prefill and decode spans of every request), each run in a fresh child process (a
  process has one tracer provider), alternating.

    python benchmark/observability_bench.py --model smollm2 --requests 16 --prompt-tokens 128 \\
        --new-tokens 64 --runs 3 --json OUT

The ratio is tok/s with observability on over tok/s with it off (the issue's bound: a cost
under 3 %, i.e. a ratio above 0.97).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ModeResult, make_prompts, percentile, report, resolve_model_dir, running_stack, write_json
from engine_bench import run_stack_once

MODES = ("engine_off", "engine_on", "stack_off", "stack_on")
SCRAPE_EVERY_S = 1.0
EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def otlp_sink(port: int) -> int:
    """Answers every OTLP trace export with an empty success, without decoding it, until killed;
    prints the exports and bytes it took when it gets SIGTERM."""
    import signal
    from concurrent import futures

    import grpc

    took = [0, 0]

    def export(request: bytes, context: object) -> bytes:
        took[0] += 1
        took[1] += len(request)
        return b""  # an empty ExportTraceServiceResponse: all accepted

    handler = grpc.unary_unary_rpc_method_handler(export)  # no (de)serializers: raw bytes
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(EXPORT_METHOD.split("/")[1], {"Export": handler})]
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    server.stop(0)
    print(json.dumps({"exports": took[0], "bytes": took[1]}), flush=True)
    return 0


class Sink:
    """The OTLP sink as a child process: `endpoint` while the block runs; `took` after it."""

    def __enter__(self) -> Sink:
        from stack import free_port

        port = free_port()
        self.endpoint = f"127.0.0.1:{port}"
        argv = [sys.executable, __file__, "--otlp-sink", str(port)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)  # it listens within this
        self.took: dict[str, int] = {}
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        self.took = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}


class Scraper:
    """Scrapes every /metrics of a stack each SCRAPE_EVERY_S, as Prometheus would (more often)."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(SCRAPE_EVERY_S):
            for address in self.addresses:
                with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
                    reply.read()
                self.scrapes += 1


def spans_exported(addresses: list[str]) -> float:
    """`wicore:trace_spans_exported_total` over the services at `addresses`."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for address in addresses:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        for family in text_string_to_metric_families(text):
            total += sum(s.value for s in family.samples if s.name == "wicore:trace_spans_exported_total")
    return total


def engine_child(args: argparse.Namespace) -> int:
    """One engine run (in its own process), its result as JSON on stdout."""
    from transformers import AutoTokenizer

    from wicore.config import load_config
    from wicore.worker.app import engine_config, load_model
    from wicore.worker.async_engine import AsyncEngine
    from wicore.worker.convert import ModelDefaults
    from wicore.worker.paged_engine import PagedEngine
    from wicore.worker.servicer import WorkerServicer

    if args.engine_child == "on":
        from wicore.config import ObservabilityConfig
        from wicore.tracing import setup_tracing

        setup_tracing("worker", ObservabilityConfig(otlp_endpoint=args.sink, sample_ratio=1.0))

    model_dir = resolve_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = make_prompts(tokenizer, args.requests, args.prompt_tokens, 0)
    prompt_ids = [list(tokenizer(p).input_ids) for p in prompts]
    config = load_config(None, {}, {"worker.model": str(model_dir)})
    loaded = load_model(config)
    paged = PagedEngine(loaded.model, engine_config(config, loaded.model), loaded.fingerprint)
    engine = AsyncEngine(paged, loaded.tokenizer)
    defaults = ModelDefaults.from_model(loaded.model, config.worker.default_max_tokens)
    servicer = WorkerServicer(engine, loaded.model_id, defaults, loaded.fingerprint, paged.pool.block_size)

    async def run(ids: list[list[int]], new: int, tag: str) -> ModeResult:
        from opentelemetry import trace

        from wicore.v1 import inference_pb2, worker_pb2

        tracer = trace.get_tracer("bench")
        start = time.perf_counter()

        async def one(i: int, prompt: list[int]) -> tuple[float, int]:
            options = inference_pb2.GenerateRequest(
                request_id=f"{tag}-{i}", max_tokens=new, ignore_eos=True,
                sampling=inference_pb2.SamplingParams(temperature=0),
            )  # fmt: skip
            request = worker_pb2.TokenizedRequest(request=options, prompt_token_ids=prompt)
            first, count = 0.0, 0
            with tracer.start_as_current_span("/wicore.v1.Worker/Generate"):  # the RPC's span, as served
                async for msg in servicer.Generate(request, None):
                    if msg.token_ids and not first:
                        first = time.perf_counter() - start
                    count += len(msg.token_ids)
            return first, count

        done = await asyncio.gather(*(one(i, p) for i, p in enumerate(ids)))
        wall = time.perf_counter() - start
        produced = sum(c for _, c in done)
        return ModeResult(produced / wall, 1000 * percentile([f for f, _ in done], 0.5), {"tokens": produced})

    async def main() -> ModeResult:
        engine.start()
        try:
            await run(prompt_ids[:2], 4, "warm")
            return await run(prompt_ids, args.new_tokens, "run")
        finally:
            engine.stop()

    result = asyncio.run(main())
    if args.engine_child == "on":
        from wicore.tracing import shutdown_tracing, span_counts

        counts = span_counts()
        shutdown_tracing()  # sends what is queued
        result.extra["spans_exported"] = counts.exported if counts else 0
    print(json.dumps(result.__dict__))
    return 0


def run_engine_mode(args: argparse.Namespace, mode: str, sink: str) -> ModeResult:
    argv = [sys.executable, __file__, "--engine-child", mode.removeprefix("engine_"), "--sink", sink,
            "--model", args.model,
            "--requests", str(args.requests), "--prompt-tokens", str(args.prompt_tokens),
            "--new-tokens", str(args.new_tokens)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{done.stderr[-3000:]}")
    return ModeResult(**json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES)
    )
    parser.add_argument("--json")
    parser.add_argument("--engine-child", choices=("on", "off"), help=argparse.SUPPRESS)
    parser.add_argument("--sink", default="", help=argparse.SUPPRESS)
    parser.add_argument("--otlp-sink", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.otlp_sink:
        return otlp_sink(args.otlp_sink)
    if args.engine_child:
        return engine_child(args)
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(set(modes) - set(MODES))}")

    from transformers import AutoTokenizer

    results: dict[str, list[ModeResult]] = {m: [] for m in modes}
    with Sink() as sink:
        for run in range(args.runs):
            for mode in (m for m in modes if m.startswith("engine_")):
                results[mode].append(run_engine_mode(args, mode, sink.endpoint))
                print(f"{mode} run {run}: {results[mode][-1]}", file=sys.stderr)

    stack_modes = [m for m in modes if m.startswith("stack_")]
    if stack_modes:
        model_dir = resolve_model_dir(args.model)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        with ExitStack() as stacks:
            sink = stacks.enter_context(Sink())
            tmp = Path(stacks.enter_context(tempfile.TemporaryDirectory()))
            off = {"observability.metrics_port": 0}
            on = {"observability.otlp_endpoint": sink.endpoint, "observability.sample_ratio": 1.0}
            running = {}
            for mode in stack_modes:
                (tmp / mode).mkdir()
                settings = {**(on if mode == "stack_on" else off), "redis.namespace": f"obs-bench-{mode}"}
                running[mode] = stacks.enter_context(running_stack(model_dir, tmp / mode, settings))
            for run in range(args.runs):
                for mode in stack_modes:
                    stack = running[mode]
                    # Prompts neither stack has seen (their prefix caches persist between runs).
                    prompts = [
                        f"{run} {p}" for p in make_prompts(tokenizer, args.requests, args.prompt_tokens, 0)
                    ]
                    with Scraper(list(stack.metrics.values())) as scraper:
                        result = asyncio.run(run_stack_once(stack.gateway, prompts, args.new_tokens))
                    result.extra["scrapes"] = scraper.scrapes
                    results[mode].append(result)
                    print(f"{mode} run {run}: {result}", file=sys.stderr)
                    if mode == "stack_on":
                        result.extra["spans_exported_so_far"] = spans_exported(list(stack.metrics.values()))
        print(f"the OTLP sink took {sink.took}", file=sys.stderr)

    params = vars(args) | {"scrape_every_s": SCRAPE_EVERY_S}
    data: dict[str, Any] = {}
    for kind in ("engine", "stack"):
        pair = {m: results[m] for m in (f"{kind}_off", f"{kind}_on") if m in results}
        if pair:
            data[kind] = report(f"observability_bench ({kind})", pair, params, f"{kind}_off")
    write_json(args.json, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
