"""The serving suite's shared core (throughput_test.py, latency_test.py, stress_test.py): where the
requests go, how one is timed, the statistics, the resource samples and the reports.

Target. `--target HOST:PORT` is a running gateway's gRPC API (`GenerateStream`); `--http URL` its
OpenAI-compatible API (`/v1/completions`, streamed, through the official `openai` client). Without
either, the script starts a stack itself (`wicore up` through the tests' launcher: free ports, a
fresh Redis namespace, `--workers`, `--set section.key=value`), serving `--model`, and stops it at
the end; then it also knows each service's process and /metrics. A target that does not answer is
an error that says so (exit status 2), before any load is sent.

One request. Every request streams: TTFT is the time from sending to the first message that
carries tokens, each later token-carrying message adds one inter-token latency (ITL: its gap to
the previous one, as vLLM's benchmark_serving counts chunks), end-to-end runs to the last
message. Requests ask for exactly `max_tokens` (`ignore_eos`), so output lengths are what the
workload says. A failed request keeps its gRPC status name (HTTP errors map to the nearest one).

Statistics. Percentiles interpolate linearly between order statistics (numpy's default);
goodput counts the completed requests whose TTFT and mean ITL are within the SLOs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ProcessSample, parse_settings, sample_process, service_pids, write_json

__all__ = ["ProcessSample", "parse_settings", "sample_process", "write_json"]  # the scripts use them here

EXIT_NO_TARGET = 2
HTTP_TO_GRPC = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


# --- one request ---


@dataclass
class RequestRecord:
    """One request's timings (seconds; `sent` on the run's clock) and outcome."""

    sent: float
    prompt_tokens: int
    max_tokens: int
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2e: float | None = None
    output_tokens: int = 0
    error: str | None = None  # a gRPC status name; None: completed

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def mean_itl(self) -> float | None:
        return sum(self.itl) / len(self.itl) if self.itl else None


class Client(Protocol):
    async def send(self, prompt: str, prompt_tokens: int, max_tokens: int, sent: float) -> RequestRecord: ...

    async def close(self) -> None: ...


class Timer:
    """Marks a streamed response's token-carrying messages: TTFT, ITLs, end-to-end."""

    def __init__(self, record: RequestRecord, clock: Callable[[], float]) -> None:
        self.record = record
        self.clock = clock
        self.start = clock()
        self.last: float | None = None

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = self.clock()
        if self.last is None:
            self.record.ttft = now - self.start
        else:
            self.record.itl.append(now - self.last)
        self.last = now
        self.record.output_tokens += n

    def done(self) -> RequestRecord:
        self.record.e2e = self.clock() - self.start
        return self.record


class GrpcClient:
    """`wicore.v1.Inference/GenerateStream` on one channel (HTTP/2 multiplexes the requests)."""

    def __init__(self, address: str, api_key: str = "", model: str = "", timeout_s: float = 600.0) -> None:
        import grpc

        from wicore.v1 import inference_pb2_grpc

        self._channel = grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", -1)])
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.model = model
        self.timeout_s = timeout_s

    async def send(self, prompt: str, prompt_tokens: int, max_tokens: int, sent: float) -> RequestRecord:
        import grpc

        from wicore.v1 import inference_pb2 as pb

        record = RequestRecord(sent, prompt_tokens, max_tokens)
        request = pb.GenerateRequest(
            model=self.model, prompt=prompt, max_tokens=max_tokens, ignore_eos=True,
            sampling=pb.SamplingParams(temperature=0.0),
        )  # fmt: skip
        timer = Timer(record, time.perf_counter)
        try:
            stream = self._stub.GenerateStream(request, metadata=self._metadata, timeout=self.timeout_s)
            async for message in stream:
                timer.tokens(len(message.token_ids))
                if message.HasField("usage") and message.usage.prompt_tokens:
                    record.prompt_tokens = message.usage.prompt_tokens
        except grpc.aio.AioRpcError as exc:
            record.error = exc.code().name
        return timer.done()

    async def close(self) -> None:
        await self._channel.close()


class HttpClient:
    """`POST /v1/completions` with `stream: true`, through the official `openai` client."""

    def __init__(self, base_url: str, api_key: str = "", model: str = "", timeout_s: float = 600.0) -> None:
        import openai

        self._client = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key or "none", timeout=timeout_s, max_retries=0
        )
        self.model = model

    async def send(self, prompt: str, prompt_tokens: int, max_tokens: int, sent: float) -> RequestRecord:
        import openai

        record = RequestRecord(sent, prompt_tokens, max_tokens)
        timer = Timer(record, time.perf_counter)
        try:
            stream = await self._client.completions.create(
                model=self.model or "default", prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            )  # fmt: skip
            async for chunk in stream:
                text = "".join(c.text for c in chunk.choices)
                if text:
                    timer.tokens(1)  # a chunk is one step's text; usage gives the true count
                if chunk.usage is not None:
                    record.prompt_tokens = chunk.usage.prompt_tokens
                    usage_tokens = chunk.usage.completion_tokens
                    record.output_tokens = usage_tokens
        except openai.APIStatusError as exc:
            record.error = HTTP_TO_GRPC.get(exc.status_code, f"HTTP_{exc.status_code}")
        except openai.APITimeoutError:
            record.error = "DEADLINE_EXCEEDED"
        except openai.APIConnectionError:
            record.error = "UNAVAILABLE"
        return timer.done()

    async def close(self) -> None:
        await self._client.close()


# --- the target ---


@dataclass
class Target:
    """Where the load goes, and what can be watched there."""

    name: str  # what the report says: grpc://…, http://…
    make_client: Callable[[], Client]
    model_dir: Path  # the served model's files (its tokenizer measures prompt lengths)
    metrics: dict[str, str] = field(default_factory=dict)  # service -> host:port of its /metrics
    pids: dict[str, int] = field(default_factory=dict)  # service -> pid, when the processes are local


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", metavar="HOST:PORT", help="a running gateway's gRPC address")
    parser.add_argument(
        "--http", metavar="URL", help="a running gateway's OpenAI API, e.g. http://host:8000/v1"
    )
    parser.add_argument(
        "--model",
        default="smollm2",
        help="the served model: 'smollm2' (bundled) or a local model directory; its tokenizer sizes the "
        "prompts, and a stack started here serves it (default smollm2)",
    )
    parser.add_argument("--api-key", default=os.environ.get("WICORE_API_KEY", ""), help="API key, if any")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and arrivals (default 0)")
    parser.add_argument("--json", metavar="OUT", help="write every number to this JSON file")
    parser.add_argument("--plot", metavar="OUT.png", help="draw the plot to this PNG file")
    parser.add_argument(
        "--metrics",
        default="",
        metavar="NAME=HOST:PORT,...",
        help="a remote target's /metrics, e.g. worker-0=10.0.0.5:9400 (known for a stack started here)",
    )
    parser.add_argument("--workers", type=int, default=1, help="workers of a stack started here (default 1)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a setting of a stack started here (repeatable)",
    )


def parse_metrics(spec: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, address = item.partition("=")
        if not sep:
            raise SystemExit(f"--metrics: expected NAME=HOST:PORT, got {item!r}")
        out[name] = address
    return out


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_NO_TARGET)


async def check_grpc(address: str, api_key: str) -> None:
    import grpc

    from wicore.v1 import inference_pb2 as pb
    from wicore.v1 import inference_pb2_grpc

    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await inference_pb2_grpc.InferenceStub(channel).ListModels(
                pb.ListModelsRequest(), metadata=metadata, timeout=5.0
            )
        except grpc.aio.AioRpcError as exc:
            fail(f"no WiCore gateway answers at {address} ({exc.code().name}: {exc.details()})")
        if not reply.models:
            fail(f"the gateway at {address} serves no model yet (no worker registered)")


async def check_http(base_url: str, api_key: str) -> str:
    """Fails (exit 2) unless the API answers and lists a model; the id of the first model listed."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "none", timeout=5.0, max_retries=0)
    try:
        models = await client.models.list()
    except openai.APIError as exc:
        fail(f"no OpenAI-compatible API answers at {base_url} ({type(exc).__name__}: {exc})")
    finally:
        await client.close()
    if not models.data:
        fail(f"the API at {base_url} lists no model")
    return models.data[0].id


@contextlib.contextmanager
def open_target(args: argparse.Namespace) -> Iterator[Target]:
    """The target the flags name, checked; or a stack started here, stopped on the way out."""
    from common import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    if args.target and args.http:
        raise SystemExit("--target and --http: give one")
    if args.target:
        asyncio.run(check_grpc(args.target, args.api_key))
        yield Target(
            f"grpc://{args.target}",
            lambda: GrpcClient(args.target, args.api_key),
            model_dir,
            metrics=parse_metrics(args.metrics),
        )
        return
    if args.http:
        served = asyncio.run(check_http(args.http, args.api_key))  # the API refuses other names
        yield Target(
            args.http,
            lambda: HttpClient(args.http, args.api_key, model=served),
            model_dir,
            metrics=parse_metrics(args.metrics),
        )
        return
    from common import running_stack

    settings = parse_settings(args.set)
    with tempfile.TemporaryDirectory(prefix="wicore-bench-") as tmp:
        print(f"starting a stack serving {args.model} ({args.workers} worker(s))...", file=sys.stderr)
        with running_stack(model_dir, Path(tmp), settings, workers=args.workers) as stack:
            yield Target(
                f"grpc://{stack.gateway} (started here)",
                lambda: GrpcClient(stack.gateway),
                model_dir,
                metrics=dict(stack.metrics),
                pids=service_pids(stack),
            )


# --- statistics ---


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (q in [0, 1]) with linear interpolation (numpy's default); NaN if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latency_summary(
    values: Sequence[float], quantiles: Sequence[float] = (0.5, 0.95, 0.99)
) -> dict[str, float]:
    """Milliseconds: mean and the given percentiles (`p50`, `p95`, ...)."""
    out = {"mean": 1000 * sum(values) / len(values) if values else math.nan}
    for q in quantiles:
        out[f"p{round(q * 100)}"] = 1000 * percentile(values, q)
    return out


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float,
    slo_ttft_s: float | None = None,
    slo_itl_s: float | None = None,
) -> dict[str, Any]:
    """The run's numbers: counts, errors by code, throughput over `duration_s`, latencies, goodput."""
    done = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
    output = sum(r.output_tokens for r in done)
    prompt = sum(r.prompt_tokens for r in done)

    def good(r: RequestRecord) -> bool:
        ttft_ok = slo_ttft_s is None or (r.ttft is not None and r.ttft <= slo_ttft_s)
        mean_itl = r.mean_itl
        itl_ok = slo_itl_s is None or mean_itl is None or mean_itl <= slo_itl_s
        return ttft_ok and itl_ok

    good_requests = sum(1 for r in done if good(r))
    return {
        "requests": len(records),
        "completed": len(done),
        "errors": errors,
        "duration_s": duration_s,
        "request_throughput": len(done) / duration_s if duration_s > 0 else math.nan,
        "output_tok_s": output / duration_s if duration_s > 0 else math.nan,
        "total_tok_s": (output + prompt) / duration_s if duration_s > 0 else math.nan,
        "ttft_ms": latency_summary([r.ttft for r in done if r.ttft is not None]),
        "itl_ms": latency_summary([x for r in done for x in r.itl]),
        "e2e_ms": latency_summary([r.e2e for r in done if r.e2e is not None]),
        "good_requests": good_requests,
        "goodput": good_requests / duration_s if duration_s > 0 else math.nan,
        "goodput_fraction": good_requests / len(done) if done else math.nan,
    }


# --- resources: local processes and /metrics ---


def scrape(address: str, timeout_s: float = 2.0) -> dict[str, float]:
    """One /metrics endpoint, as {'name{label="v",...}': value} (Prometheus' own text parser);
    {} when it does not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout_s) as reply:
            text = reply.read().decode()
    except OSError:
        return {}
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def metric_sum(samples: dict[str, float], name: str) -> float | None:
    """The sum of one metric's samples over all its label sets; None if absent."""
    values = [v for k, v in samples.items() if k == name or k.startswith(name + "{")]
    return sum(values) if values else None


class CpuMeter:
    """CPU utilisation of the worker processes over an interval: CPU seconds used / (wall seconds x
    cores), from /proc for local workers, else from each worker's `process_cpu_seconds_total`."""

    def __init__(self, target: Target) -> None:
        self.pids = {k: v for k, v in target.pids.items() if k.startswith("worker")}
        self.metrics = {k: v for k, v in target.metrics.items() if k.startswith("worker")}
        self._start: tuple[float, float] | None = None

    def _cpu_seconds(self) -> float | None:
        if self.pids:
            samples = [sample_process(pid) for pid in self.pids.values()]
            return sum(s.cpu_s for s in samples if s is not None)
        if self.metrics:
            values = [metric_sum(scrape(a), "process_cpu_seconds_total") for a in self.metrics.values()]
            known = [v for v in values if v is not None]
            return sum(known) if known else None
        return None

    def start(self) -> None:
        cpu = self._cpu_seconds()
        self._start = (time.monotonic(), cpu) if cpu is not None else None

    def stop(self) -> float | None:
        """The share of the machine's cores the workers used since `start` (0-1); None: unknown."""
        cpu = self._cpu_seconds()
        if self._start is None or cpu is None:
            return None
        wall = time.monotonic() - self._start[0]
        return (cpu - self._start[1]) / (wall * (os.cpu_count() or 1)) if wall > 0 else None


class GpuMeter:
    """Mean GPU utilisation over an interval through NVML, sampled every 0.5 s; absent without a GPU."""

    def __init__(self) -> None:
        self._samples: list[float] = []
        self._task: asyncio.Task[None] | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self._nvml: Any = pynvml
        except Exception:  # no library, no driver, no GPU: utilisation is not measurable
            self._handles = []

    @property
    def available(self) -> bool:
        return bool(self._handles)

    async def _loop(self) -> None:
        while True:
            rates = [self._nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self._handles]
            self._samples.append(sum(rates) / len(rates) / 100)
            await asyncio.sleep(0.5)

    def start(self) -> None:
        if self.available:
            self._samples = []
            self._task = asyncio.create_task(self._loop())

    async def stop(self) -> float | None:
        if self._task is None:
            return None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        return sum(self._samples) / len(self._samples) if self._samples else None


# --- running and reporting ---


@contextlib.asynccontextmanager
async def clients(target: Target) -> AsyncIterator[Client]:
    client = target.make_client()
    try:
        yield client
    finally:
        await client.close()


def progress(total: float, description: str, unit: str = "s") -> Any:
    """A progress bar on stderr (tqdm); `update(n)` advances it."""
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3g}"
        return "-" if value is None else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", file=sys.stderr)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import platform

    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / (1 << 20), 1)
                break
    return info
