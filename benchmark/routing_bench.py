"""Routing across workers: MoR against round-robin and least-loaded, in one run.

A multi-tenant chat workload through the whole stack (`wicore up --workers N`):
`--tenants` system prompts of `--system-tokens` words each, `--sessions`
sessions (session i belongs to tenant i mod tenants) of `--turns` turns each;
every turn sends the tenant's system prompt, the session's history (earlier
user messages and the model's replies) and a new user message, greedy,
exactly `--new-tokens` new tokens. `--concurrency` clients each run one
session at a time, turn after turn (closed loop), so sessions return with a
longer prompt whose prefix some worker computed before.

For each policy a fresh stack starts (empty caches), the policies' order
rotating between runs; each worker gets `--worker-threads` torch threads so
the workers do not fight over the cores. Reported per policy, medians over
`--runs`: tok/s (completion tokens / wall time), TTFT p50 (request sent ->
first token) and the prefix hit rate (cached prompt tokens / prompt tokens,
from each reply's usage).

    python benchmark/routing_bench.py [--model tiny|smollm2|PATH] --workers 2 --runs 3 --json OUT

`--workload multitenant` is the workload prefix-aware routing exists for, llm-d's
benchmark scaled to this machine: `--tenants` long system prompts
(`--system-tokens`), each request one tenant's prompt plus a new question, open-loop
Poisson arrivals whose rate ramps through `--rates` (req/s), `--step-requests`
arrivals per step, back to back. Each worker's KV pool is sized so that all the
tenants' prefixes take `--prefix-share` (0.73, llm-d's figure) of the workers' pools
together: they fit in the cluster, not in one worker. Tier offload is off
(`worker.kv_offload=false`) so that a prefix a worker lost must be recomputed: with
one shared node tier any worker could load any prefix and routing would matter
less (`--set worker.kv_offload=true` measures that). Reported per policy and step,
medians over runs: TTFT p50 and p90 (from the request's scheduled arrival, so
waiting in any queue counts), tok/s (the step's completion tokens over the time
from its first arrival to its last finish) and the prefix hit rate.

    python benchmark/routing_bench.py --workload multitenant --model small --workers 2 --runs 3 --json OUT
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    WORDS,
    ModeResult,
    parse_settings,
    percentile,
    report,
    resolve_model_dir,
    running_stack,
    write_json,
)

POLICIES = ("mor", "round_robin", "least_loaded")
# Variants measured like policies: MoR without waiting for a busy worker that holds the prefix.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"mor_nowait": ("mor", {"scheduler.prefix_wait_factor": 0})}


@dataclass(frozen=True)
class Workload:
    systems: list[str]  # one per tenant
    sessions: list[tuple[int, list[str]]]  # (tenant, user message per turn)
    new_tokens: int


def make_workload(args: argparse.Namespace) -> Workload:
    rng = random.Random(args.seed)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    systems = [
        f"You are assistant {t} of tenant {t}. {words(args.system_tokens)}" for t in range(args.tenants)
    ]
    sessions = [
        (i % args.tenants, [f"Question {turn}: {words(args.user_tokens)}" for turn in range(args.turns)])
        for i in range(args.sessions)
    ]
    return Workload(systems, sessions, args.new_tokens)


def model_dir(spec: str, tmp: Path) -> Path:
    if spec == "tiny":
        from tiny_models import save_tiny

        return save_tiny("llama", tmp / "tiny-llama", max_context=8192)
    if spec == "small":
        return save_small_llama(tmp / "small-llama")
    return resolve_model_dir(spec)


def save_small_llama(path: Path) -> Path:
    """A random 26M-parameter Llama (8 layers, hidden 512, 2 KV heads) with the tests' byte-level
    tokenizer: prefill costs what it would on a real small model, so a prefix miss is expensive
    and a hit cheap, and a ramp still runs in minutes on two cores."""
    from tiny_models import save_tiny

    return save_tiny(
        "llama", path, max_context=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=2,
    )  # fmt: skip


def policy_settings(policy: str, args: argparse.Namespace, kv_cache_bytes: int = 0) -> dict[str, Any]:
    policy, variant = VARIANTS.get(policy, (policy, {}))
    settings = {
        "scheduler.routing_policy": policy,
        "worker.num_threads": args.worker_threads,
        "worker.max_batch_size": args.max_batch_size,
        "redis.namespace": f"routing-bench-{os.getpid()}-{policy}-{time.monotonic_ns()}",
    }
    if args.kv_cache_mib or kv_cache_bytes:
        settings["worker.kv_cache_bytes"] = args.kv_cache_mib << 20 or kv_cache_bytes
    if args.workload == "multitenant":
        settings["worker.kv_offload"] = False
    return settings | variant | parse_settings(args.set)


async def run_workload(address: str, workload: Workload, concurrency: int) -> ModeResult:
    import grpc

    from wicore.v1 import inference_pb2 as pb
    from wicore.v1 import inference_pb2_grpc

    ttfts: list[float] = []
    prompt_tokens = cached_tokens = produced = 0
    pending = list(range(len(workload.sessions)))

    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def turn(prompt: str) -> str:
            nonlocal prompt_tokens, cached_tokens, produced
            request = pb.GenerateRequest(
                prompt=prompt, max_tokens=workload.new_tokens, ignore_eos=True,
                sampling=pb.SamplingParams(temperature=0.0),
            )  # fmt: skip
            sent, first, text = time.perf_counter(), 0.0, []
            async for msg in stub.GenerateStream(request):
                if msg.token_ids and not first:
                    first = time.perf_counter()
                text.append(msg.text)
                produced += len(msg.token_ids)
                if msg.finish_reason:
                    prompt_tokens += msg.usage.prompt_tokens
                    cached_tokens += msg.usage.cached_tokens
            ttfts.append(first - sent)
            return "".join(text)

        async def client() -> None:
            while pending:
                tenant, messages = workload.sessions[pending.pop(0)]
                history = ""
                for message in messages:
                    reply = await turn(f"{workload.systems[tenant]}\n{history}User: {message}\nAssistant:")
                    history += f"User: {message}\nAssistant:{reply}\n"

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    hit_rate = cached_tokens / prompt_tokens if prompt_tokens else 0.0
    return ModeResult(
        produced / wall,
        1000 * percentile(ttfts, 0.5),
        {"prefix_hit_rate": hit_rate, "requests": len(ttfts), "tokens": produced, "wall_s": wall},
    )


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the ramp starts
    step: int  # index into the rates
    tenant: int
    prompt: str


@dataclass(frozen=True)
class MultiTenant:
    systems: list[str]  # one per tenant
    warmup: list[str]  # each tenant's prompt once, before the ramp (not measured)
    arrivals: list[Arrival]
    rates: list[float]
    new_tokens: int


def make_multitenant(args: argparse.Namespace) -> MultiTenant:
    """Seeded: tenant t's system prompt, then `--step-requests` Poisson arrivals per rate, the
    tenant of each drawn with weight 1 / (t + 1)^tenant_zipf (0: uniform)."""
    rng = random.Random(args.seed)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    systems = [f"Tenant {t} instructions: {words(args.system_tokens)}" for t in range(args.tenants)]
    weights = [1.0 / (t + 1) ** args.tenant_zipf for t in range(args.tenants)]

    def prompt(tenant: int, n: int) -> str:
        return f"{systems[tenant]}\nQuestion {n}: {words(args.user_tokens)}\nAnswer:"

    warmup = [prompt(t, -t - 1) for t in range(args.tenants)]
    arrivals, at = [], 0.0
    for step, rate in enumerate(args.rates):
        for _ in range(args.step_requests):
            at += rng.expovariate(rate)
            tenant = rng.choices(range(args.tenants), weights)[0]
            arrivals.append(Arrival(at, step, tenant, prompt(tenant, len(arrivals))))
    return MultiTenant(systems, warmup, arrivals, list(args.rates), args.new_tokens)


def kv_pool_bytes(model: Path, prefix_tokens: int, workers: int, share: float, block_size: int = 16) -> int:
    """Each worker's KV pool such that `prefix_tokens` (all the tenants' prefixes) take `share`
    of the workers' pools together: blocks = ceil(prefix blocks / (share · workers)), each of the
    size the worker's own pool gives it in fp32 (a CPU worker's dtype)."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoConfig

    from wicore.worker.model_runner import kv_layout
    from wicore.worker.paged_attention import KVPool

    layers, kv_heads, head_dim = kv_layout(SimpleNamespace(config=AutoConfig.from_pretrained(model)))
    block_bytes = KVPool.bytes_per_block(layers, block_size, kv_heads, head_dim, torch.float32)
    return math.ceil(math.ceil(prefix_tokens / block_size) / (share * workers)) * block_bytes


@dataclass
class Outcome:
    step: int
    ttft: float  # seconds from the scheduled arrival to the first token
    finished: float  # seconds after the ramp started
    tokens: int
    prompt_tokens: int
    cached_tokens: int
    error: str = ""  # the gRPC status of a request that failed (timed out, say)


async def run_multitenant(address: str, workload: MultiTenant, timeout_s: float) -> list[Outcome]:
    """Warm-up (each tenant once, one at a time), then the open-loop ramp: every arrival is sent
    at its time whatever is still in flight."""
    import grpc

    from wicore.v1 import inference_pb2 as pb
    from wicore.v1 import inference_pb2_grpc

    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def send(prompt: str, step: int, due: float, start: float) -> Outcome:
            request = pb.GenerateRequest(
                prompt=prompt, max_tokens=workload.new_tokens, ignore_eos=True,
                sampling=pb.SamplingParams(temperature=0.0),
            )  # fmt: skip
            first, tokens, usage = 0.0, 0, pb.Usage()
            async for msg in stub.GenerateStream(request, timeout=timeout_s):
                if msg.token_ids and not first:
                    first = loop.time()
                tokens += len(msg.token_ids)
                if msg.finish_reason:
                    usage = msg.usage
            end = loop.time()
            return Outcome(step, first - due, end - start, tokens, usage.prompt_tokens, usage.cached_tokens)

        for prompt in workload.warmup:
            now = loop.time()
            await send(prompt, -1, now, now)
        start = loop.time() + 0.2

        async def arrive(a: Arrival) -> Outcome:
            await asyncio.sleep(max(0.0, start + a.at - loop.time()))
            try:
                return await send(a.prompt, a.step, start + a.at, start)
            except grpc.aio.AioRpcError as exc:  # counted, not fatal: an overloaded step is a result
                return Outcome(a.step, math.inf, loop.time() - start, 0, 0, 0, exc.code().name)

        return list(await asyncio.gather(*(arrive(a) for a in workload.arrivals)))


def step_stats(outcomes: list[Outcome], workload: MultiTenant) -> dict[str, dict[str, float]]:
    """Per step (keyed by its rate): ttft_p50_ms, ttft_p90_ms, tok_s, prefix_hit_rate, errors.
    A failed request counts as an infinitely late first token in the percentiles (a p90 of
    inf: more than a tenth failed); tok/s is the step's completion tokens over the time from its
    first arrival to its last finish (requests that run into the next step included)."""
    stats: dict[str, dict[str, float]] = {}
    for step, rate in enumerate(workload.rates):
        mine = [o for o in outcomes if o.step == step]
        first_arrival = min(a.at for a in workload.arrivals if a.step == step)
        ttfts = [o.ttft for o in mine]
        prompt = sum(o.prompt_tokens for o in mine)
        stats[f"{rate:g}"] = {
            "ttft_p50_ms": 1000 * percentile(ttfts, 0.5),
            "ttft_p90_ms": 1000 * percentile(ttfts, 0.9),
            "tok_s": sum(o.tokens for o in mine) / (max(o.finished for o in mine) - first_arrival),
            "prefix_hit_rate": sum(o.cached_tokens for o in mine) / prompt if prompt else 0.0,
            "errors": sum(1 for o in mine if o.error),
        }
    return stats


def run_policy(model: Path, policy: str, workload: Workload, args: argparse.Namespace) -> ModeResult:
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_stack(model, Path(tmp), policy_settings(policy, args), args.workers) as stack,
    ):
        return asyncio.run(run_workload(stack.gateway, workload, args.concurrency))


def _rates(text: str) -> list[float]:
    rates = [float(r) for r in text.split(",") if r]
    if not rates or any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"expected positive req/s values separated by commas, got {text!r}")
    return rates


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", choices=("sessions", "multitenant"), default="sessions")
    parser.add_argument(
        "--model",
        default="tiny",
        help="tiny (a random 0.2M Llama), small (a random 26M Llama), smollm2, or a path",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker-threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests in flight per worker")
    parser.add_argument(
        "--kv-cache-mib", type=int, default=0,
        help="KV pool per worker (0: the default; multitenant: sized by --prefix-share)",
    )  # fmt: skip
    parser.add_argument("--tenants", type=int, help="sessions: 4; multitenant: 12")
    parser.add_argument(
        "--system-tokens", type=int, help="words per system prompt (sessions: 384; multitenant: 256)"
    )
    parser.add_argument(
        "--user-tokens", type=int, help="words per user message (sessions: 48; multitenant: 16)"
    )
    parser.add_argument("--new-tokens", type=int, help="tokens per reply (sessions: 24; multitenant: 16)")
    parser.add_argument("--sessions", type=int, default=16, help="sessions")
    parser.add_argument("--turns", type=int, default=3, help="sessions")
    parser.add_argument(
        "--concurrency", type=int, default=4, help="sessions: clients, one session at a time each"
    )
    parser.add_argument(
        "--rates", type=_rates, default=[1.0, 2.0, 4.0, 8.0, 16.0], help="multitenant: req/s steps"
    )
    parser.add_argument("--step-requests", type=int, default=40, help="multitenant: arrivals per step")
    parser.add_argument("--tenant-zipf", type=float, default=0.0, help="multitenant: tenant popularity skew")
    parser.add_argument(
        "--prefix-share", type=float, default=0.73,
        help="multitenant: the tenants' prefixes as a share of all workers' KV pools",
    )  # fmt: skip
    parser.add_argument(
        "--request-timeout", type=float, default=300.0, help="multitenant: seconds per request"
    )
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--json")
    args = parser.parse_args()
    defaults = {"sessions": (4, 384, 48, 24), "multitenant": (12, 256, 16, 16)}[args.workload]
    for name, default in zip(
        ("tenants", "system_tokens", "user_tokens", "new_tokens"), defaults, strict=True
    ):
        if getattr(args, name) is None:
            setattr(args, name, default)
    args.policies = [p for p in args.policies.split(",") if p]
    if unknown := set(args.policies) - set(POLICIES) - set(VARIANTS):
        parser.error(f"unknown policies {sorted(unknown)} (known: {', '.join([*POLICIES, *VARIANTS])})")
    if not 0 < args.prefix_share <= 1:
        parser.error(f"--prefix-share: must be in (0, 1], got {args.prefix_share}")
    parse_settings(args.set)  # fails early on a malformed --set
    return args


def rotations(policies: list[str], runs: int) -> Iterator[tuple[int, list[str]]]:
    """Each run's policy order, rotated so that no policy always goes first."""
    for run in range(runs):
        yield run, policies[run % len(policies) :] + policies[: run % len(policies)]


def main_sessions(args: argparse.Namespace, model: Path) -> dict[str, Any]:
    workload = make_workload(args)
    results: dict[str, list[ModeResult]] = {p: [] for p in args.policies}
    for run, order in rotations(args.policies, args.runs):
        for policy in order:
            result = run_policy(model, policy, workload, args)
            results[policy].append(result)
            print(f"run {run} {policy}: {result}", file=sys.stderr)
    baseline = "round_robin" if "round_robin" in results else args.policies[0]
    data = report("routing_bench", results, vars(args), baseline)
    data["prefix_hit_rate"] = {
        p: statistics.median(r.extra["prefix_hit_rate"] for r in runs) for p, runs in results.items()
    }
    for p in results:
        ttft_ratio = data["ttft_p50_ms"][p] / data["ttft_p50_ms"][baseline]
        print(
            f"{p:<20}prefix hit rate {data['prefix_hit_rate'][p]:.3f}, ttft p50 / {baseline} {ttft_ratio:.2f}"
        )
    return data


def main_multitenant(args: argparse.Namespace, model: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    workload = make_multitenant(args)
    tokenizer = AutoTokenizer.from_pretrained(model)
    prefix_tokens = sum(len(tokenizer(s).input_ids) for s in workload.systems)
    block_size = int(parse_settings(args.set).get("worker.block_size", 16))
    pool = kv_pool_bytes(model, prefix_tokens, args.workers, args.prefix_share, block_size)
    print(f"{args.tenants} tenants, {prefix_tokens} prefix tokens; KV pool {pool / 2**20:.1f} MiB per worker",
          file=sys.stderr)  # fmt: skip
    runs: dict[str, list[dict[str, dict[str, float]]]] = {p: [] for p in args.policies}
    for run, order in rotations(args.policies, args.runs):
        for policy in order:
            with (
                tempfile.TemporaryDirectory() as tmp,
                running_stack(model, Path(tmp), policy_settings(policy, args, pool), args.workers) as stack,
            ):
                outcomes = asyncio.run(run_multitenant(stack.gateway, workload, args.request_timeout))
            runs[policy].append(step_stats(outcomes, workload))
            print(f"run {run} {policy}: {runs[policy][-1]}", file=sys.stderr)
    steps = [f"{r:g}" for r in workload.rates]
    data: dict[str, Any] = {"params": vars(args) | {"kv_cache_bytes": pool, "prefix_tokens": prefix_tokens}}
    data["settings"] = {p: policy_settings(p, args, pool) for p in args.policies}
    for key in ("ttft_p50_ms", "ttft_p90_ms", "tok_s", "prefix_hit_rate", "errors"):
        data[key] = {
            p: {s: statistics.median(r[s][key] for r in rs) for s in steps} for p, rs in runs.items()
        }
    data["runs"] = runs
    print(f"\nrouting_bench multitenant, {args.workers} workers: medians over {args.runs} runs")
    baseline = "least_loaded" if "least_loaded" in runs else args.policies[0]
    print(f"{'req/s':>6}  {'policy':<14}{'ttft p50 ms':>12}{'ttft p90 ms':>12}{'p90 ratio':>10}"
          f"{'tok/s':>8}{'hit rate':>10}")  # fmt: skip
    for s in steps:
        for p in runs:
            p90 = data["ttft_p90_ms"][p][s]
            ratio = p90 / data["ttft_p90_ms"][baseline][s]
            print(f"{s:>6}  {p:<14}{data['ttft_p50_ms'][p][s]:>12.0f}{p90:>12.0f}{ratio:>10.2f}"
                  f"{data['tok_s'][p][s]:>8.1f}{data['prefix_hit_rate'][p][s]:>10.3f}")  # fmt: skip
    print(f"(p90 ratio: against {baseline} at the same step)")
    return data


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = model_dir(args.model, Path(tmp))
        data = main_multitenant(args, model) if args.workload == "multitenant" else main_sessions(args, model)
    write_json(args.json, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
