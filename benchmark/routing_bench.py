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
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORDS, ModeResult, percentile, report, resolve_model_dir, running_stack, write_json

POLICIES = ("mor", "round_robin", "least_loaded")


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
    if spec != "tiny":
        return resolve_model_dir(spec)
    from tiny_models import save_tiny

    return save_tiny("llama", tmp / "tiny-llama", max_context=8192)


def policy_settings(policy: str, args: argparse.Namespace) -> dict[str, Any]:
    settings = {
        "scheduler.routing_policy": policy,
        "worker.num_threads": args.worker_threads,
        "worker.max_batch_size": args.max_batch_size,
        "redis.namespace": f"routing-bench-{os.getpid()}-{policy}-{time.monotonic_ns()}",
    }
    if args.kv_cache_mib:
        settings["worker.kv_cache_bytes"] = args.kv_cache_mib << 20
    return settings


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


def run_policy(model: Path, policy: str, workload: Workload, args: argparse.Namespace) -> ModeResult:
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_stack(model, Path(tmp), policy_settings(policy, args), args.workers) as stack,
    ):
        return asyncio.run(run_workload(stack.gateway, workload, args.concurrency))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="tiny", help="tiny (a random 20M Llama), smollm2, or a model directory"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker-threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests in flight per worker")
    parser.add_argument("--kv-cache-mib", type=int, default=0, help="KV pool per worker (0: the default)")
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=384, help="words per system prompt")
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--user-tokens", type=int, default=48, help="words per user message")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=4, help="clients, one session at a time each")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--json")
    args = parser.parse_args()
    policies = [p for p in args.policies.split(",") if p]
    if unknown := set(policies) - set(POLICIES):
        parser.error(f"unknown policies {sorted(unknown)} (known: {', '.join(POLICIES)})")

    workload = make_workload(args)
    results: dict[str, list[ModeResult]] = {p: [] for p in policies}
    with tempfile.TemporaryDirectory() as tmp:
        model = model_dir(args.model, Path(tmp))
        for run in range(args.runs):
            order = policies[run % len(policies) :] + policies[: run % len(policies)]
            for policy in order:
                result = run_policy(model, policy, workload, args)
                results[policy].append(result)
                print(f"run {run} {policy}: {result}", file=sys.stderr)
    baseline = "round_robin" if "round_robin" in results else policies[0]
    data = report("routing_bench", results, vars(args), baseline)
    data["prefix_hit_rate"] = {
        p: statistics.median(r.extra["prefix_hit_rate"] for r in runs) for p, runs in results.items()
    }
    for p in results:
        ttft_ratio = data["ttft_p50_ms"][p] / data["ttft_p50_ms"][baseline]
        print(
            f"{p:<20}prefix hit rate {data['prefix_hit_rate'][p]:.3f}, ttft p50 / {baseline} {ttft_ratio:.2f}"
        )
    write_json(args.json, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
