"""Multi-turn conversations whose KV far exceeds the device pool: time to first token
and throughput with the KV offload path (HMT) against recomputing every prompt.

    python benchmark/multiturn_bench.py --json OUT [--conversations 8 --turns 3 --runs 1]

Each conversation opens with its own ~1,000-token document (seeded common words) and a
question; each later turn resends the whole history (the previous prompt and its reply)
plus a new ~40-token user message, as chat clients do. Raw text prompts, greedy,
`max_tokens` fixed with `ignore_eos`. Requests go one at a time (`--concurrency 1`), so
TTFT measures the prefix path, not queueing.

    round 1: c0 c1 c2 ... c7  (every conversation's turn 1)
    round 2: c4 c2 c5 ... c3  (every conversation's turn 2, shuffled)   a user returns
    round 3: c7 c4 c2 ... c6  (...)                                     after ~C-1 others

Rounds after the first are shuffled (seeded; `--order round-robin` keeps c0..cN-1), so
that users come back after between 2 and 2C-2 others: with a strict round-robin every
user returns after exactly C-1 others, and under a recency policy a CPU tier smaller than
the working set then never holds the returning history (all hits would come from NVMe).

The device pool (`--kv-cache-mib`, default 128 MiB = 182 SmolLM2 fp32 blocks of 737,280
bytes) holds about two conversations, so returning histories have left the device. Modes,
each on a fresh stack (state dir, NVMe dir, Redis namespace):

    hmt        offload on; CPU tier sized for `--hmt-cpu-conversations` conversations in
               its codec (q8), the rest spills on to NVMe (q4)
    cpu_only   offload on; CPU tier large, no NVMe tier
    nvme_only  offload on; no CPU tier, NVMe large
    recompute  offload off (the device prefix cache only)
    hmt_lru    hmt with `tier.policy: lru` (hmt_lfu: lfu) instead of A²CR: the eviction
               policies compared on returning-turn TTFT through the real tiers

Lossy tier codecs can change the generated text slightly; this is a speed benchmark.
Hit tokens by tier: cpu / nvme = blocks the tier's GetBlocks served from each tier x block
size, from its Stats deltas: CPU hits; NVMe hits, capped by the CPU misses when there is a
CPU tier, because NVMe hits also count the reads of the scheduler's Prefetch (reported
apart as `nvme_read_tokens`). device = sum(usage.cached_tokens) - cpu - nvme: it also
counts blocks reloaded from the worker's not-yet-acknowledged spill copies, and goes
negative when the tiers served blocks that the worker then did not reuse.
`returning_turns_missed` counts returning turns that reused under half their prompt.
`--runs N` repeats all modes N times, interleaved (mode order rotated each run), and
reports medians; the default is 1 because one run of the four modes takes 4-7 minutes on
a 2-core machine (noisy when other processes share it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORDS, percentile, resolve_model_dir, running_stack, write_json
from engine_bench import stack_settings

if TYPE_CHECKING:
    from stack import Stack

MODES = ("hmt", "cpu_only", "nvme_only", "recompute")
# hmt under another eviction policy than the default (A²CR): the tiers' tier.policy
POLICY_MODES = {"hmt_lru": "lru", "hmt_lfu": "lfu"}
MiB = 2**20
TTFT_TARGET = 0.5  # returning-turn TTFT p50 of hmt, as a fraction of recompute's


@dataclass(slots=True)
class Turn:
    conversation: int
    turn: int  # 1-based
    ttft_ms: float
    latency_ms: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass(slots=True)
class ModeRun:
    mode: str
    wall_s: float
    turns: list[Turn]
    tier_hits: dict[str, int]  # blocks served per tier during the workload (and NVMe reads)
    tier_stats: dict[str, Any]  # the tier's Stats after the workload
    costs: dict[str, float]  # what the worker measured: prefill tok/s, seconds to load a block per tier

    @property
    def tok_s(self) -> float:
        return sum(t.completion_tokens for t in self.turns) / self.wall_s


# --- the workload ---


def words(rng: random.Random, tokenizer: Any, tokens: int) -> str:
    """Common words trimmed to `tokens` tokens (a word is about one token for these)."""
    text = " ".join(rng.choice(WORDS) for _ in range(tokens + 8))
    return str(tokenizer.decode(tokenizer(text).input_ids[:tokens], skip_special_tokens=True))


def make_conversations(tokenizer: Any, args: argparse.Namespace) -> list[list[str]]:
    """Per conversation, the text each turn appends: turn 1 is the document and a question."""
    conversations = []
    for c in range(args.conversations):
        rng = random.Random(args.seed * 1000 + c)
        document = f"Document {c}:\n" + words(rng, tokenizer, args.context_tokens)
        parts = [f"{document}\n\nUser: {words(rng, tokenizer, args.message_tokens)}\nAssistant:"]
        parts += [
            f"\nUser: {words(rng, tokenizer, args.message_tokens)}\nAssistant:" for _ in range(args.turns - 1)
        ]
        conversations.append(parts)
    return conversations


def make_order(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(conversation, turn) in sending order: round by round, shuffled within a round so
    that a user returns after at least 2 others (when there are enough conversations)."""
    rng = random.Random(args.seed)
    order: list[tuple[int, int]] = []
    previous = list(range(args.conversations))
    for turn in range(1, args.turns + 1):
        convs = list(range(args.conversations))
        for _ in range(1000 if args.order == "shuffle" and turn > 1 else 0):
            rng.shuffle(convs)
            between = {c: len(previous) - 1 - previous.index(c) + convs.index(c) for c in convs}
            if min(between.values()) >= min(2, args.conversations - 1):
                break
        order += [(c, turn) for c in convs]
        previous = convs
    return order


async def run_workload(
    address: str, conversations: list[list[str]], order: list[tuple[int, int]], args: argparse.Namespace
) -> tuple[float, list[Turn]]:
    import grpc

    from wicore.v1 import inference_pb2 as pb
    from wicore.v1 import inference_pb2_grpc

    history = ["" for _ in conversations]
    done = {(c, 0): asyncio.Event() for c in range(len(conversations))}
    for event in done.values():
        event.set()
    done |= {key: asyncio.Event() for key in order}
    queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    for key in order:
        queue.put_nowait(key)
    turns: list[Turn] = []

    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def one(conv: int, turn: int) -> None:
            await done[(conv, turn - 1)].wait()  # the previous turn's reply is part of this prompt
            prompt = history[conv] + conversations[conv][turn - 1]
            request = pb.GenerateRequest(
                prompt=prompt, max_tokens=args.max_tokens, ignore_eos=True,
                sampling=pb.SamplingParams(temperature=0),
            )  # fmt: skip
            start = time.perf_counter()
            first, reply, usage = 0.0, [], None
            async for msg in stub.GenerateStream(request, timeout=600):
                if msg.token_ids and not first:
                    first = time.perf_counter() - start
                reply.append(msg.text)
                if msg.HasField("usage"):
                    usage = msg.usage
            assert usage is not None, "the stream ended without usage"
            history[conv] = prompt + "".join(reply)
            turns.append(
                Turn(conv, turn, 1000 * first, 1000 * (time.perf_counter() - start), usage.prompt_tokens,
                     usage.cached_tokens, usage.completion_tokens)
            )  # fmt: skip
            done[(conv, turn)].set()

        async def client() -> None:
            while not queue.empty():
                await one(*queue.get_nowait())

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(args.concurrency)))
        wall = time.perf_counter() - start
    return wall, turns


async def warm_up(address: str) -> None:
    """A few short requests (kernels, first-call costs); the worker may still be registering."""
    import grpc

    from wicore.v1 import inference_pb2 as pb
    from wicore.v1 import inference_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        prompt = " ".join(WORDS[:200])
        for attempt in range(10):
            try:
                for i in range(2):
                    request = pb.GenerateRequest(prompt=f"{i} {prompt}", max_tokens=4, ignore_eos=True)
                    await stub.Generate(request, timeout=120)
                return
            except grpc.aio.AioRpcError:
                if attempt == 9:
                    raise
                await asyncio.sleep(1)


def worker_costs(stack: Stack) -> dict[str, float]:
    """The worker's measured prefill speed and per-tier block load time, from its /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{stack.metrics['worker-0']}/metrics", timeout=10) as reply:
        families = {f.name: f for f in text_string_to_metric_families(reply.read().decode())}
    costs = {"prefill_tokens_per_s": families["wicore:prefill_tokens_per_second"].samples[0].value}
    load = families.get("wicore:kv_block_load_seconds")
    for sample in load.samples if load else []:
        costs[f"load_s_per_block_{sample.labels['source']}"] = sample.value
    return costs


async def tier_stats(stack: Stack) -> dict[str, Any]:
    """The stack's tier's Stats, over a channel with the stack's internal token."""
    from google.protobuf.json_format import MessageToDict

    from wicore.v1 import tier_pb2, tier_pb2_grpc

    async with stack.internal_channel(stack.tier) as channel:
        reply = await tier_pb2_grpc.TierStub(channel).Stats(tier_pb2.StatsRequest(), timeout=30)
    stats = MessageToDict(reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    for key in ("hits", "misses"):
        stats[key] = {
            tier_pb2.StorageTier.Name(t.tier).removeprefix("STORAGE_TIER_").lower(): getattr(t, key)
            for t in reply.tiers
        }
    return stats


def served_blocks(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """Blocks GetBlocks served per tier between two Stats. NVMe `hits` also count the reads of
    Prefetch (the scheduler's promotions to the CPU tier); with a CPU tier, every block a
    GetBlocks asks for is counted as a CPU hit or miss (Prefetch is not), and a CPU miss is
    then read from NVMe, so the NVMe blocks served are at most the CPU misses."""
    delta = {
        key: {t: after[key].get(t, 0) - before[key].get(t, 0) for t in ("cpu", "nvme")}
        for key in ("hits", "misses")
    }
    nvme = delta["hits"]["nvme"]
    if "cpu" in after["hits"]:
        nvme = min(nvme, delta["misses"]["cpu"])
    return {"cpu": delta["hits"]["cpu"], "nvme": nvme, "nvme_reads": delta["hits"]["nvme"]}


# --- stacks ---


def mode_settings(mode: str, args: argparse.Namespace, run: int) -> dict[str, Any]:
    large = args.large_tier_mib * MiB
    settings: dict[str, Any] = stack_settings(args) | {
        "worker.kv_cache_bytes": args.kv_cache_mib * MiB,
        "worker.kv_offload": mode != "recompute",
        "redis.namespace": f"multiturn-{os.getpid()}-{run}-{mode}",
    }
    if mode == "hmt" or mode in POLICY_MODES:
        settings |= {"tier.cpu_capacity_bytes": args.hmt_cpu_bytes, "tier.nvme_capacity_bytes": large}
        if mode in POLICY_MODES:
            settings["tier.policy"] = POLICY_MODES[mode]
    elif mode == "cpu_only":
        settings |= {"tier.cpu_capacity_bytes": large, "tier.nvme_capacity_bytes": 0}
    elif mode == "nvme_only":
        settings |= {"tier.cpu_capacity_bytes": 0, "tier.nvme_capacity_bytes": large}
    return settings


def run_mode(
    mode: str, run: int, model_dir: Path, conversations: list[list[str]], order: list[tuple[int, int]],
    args: argparse.Namespace,
) -> ModeRun:  # fmt: skip
    with tempfile.TemporaryDirectory(prefix=f"multiturn-{mode}-") as tmp:
        state = Path(args.keep_state) / f"run{run}-{mode}" if args.keep_state else Path(tmp)
        state.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with running_stack(model_dir, state, mode_settings(mode, args, run)) as stack:
            print(f"[{mode} run {run}] stack up in {time.perf_counter() - started:.0f} s", file=sys.stderr)
            asyncio.run(warm_up(stack.gateway))
            before = asyncio.run(tier_stats(stack))
            wall, turns = asyncio.run(run_workload(stack.gateway, conversations, order, args))
            after = asyncio.run(tier_stats(stack))
            costs = worker_costs(stack)
    hits = served_blocks(before, after)
    result = ModeRun(mode, wall, turns, hits, after, costs)
    print(f"[{mode} run {run}] {wall:.1f} s, {result.tok_s:.2f} tok/s, tier blocks {hits}", file=sys.stderr)
    print(f"[{mode} run {run}] the worker measured {costs}", file=sys.stderr)
    return result


# --- the report ---


def summarise(runs: list[ModeRun], block_size: int) -> dict[str, Any]:
    """Per run figures, then the median over runs."""
    per_run: list[dict[str, Any]] = []
    for r in runs:
        returning = [t.ttft_ms for t in r.turns if t.turn > 1]
        first = [t.ttft_ms for t in r.turns if t.turn == 1]
        every = [t.ttft_ms for t in r.turns]
        cpu, nvme = (r.tier_hits[t] * block_size for t in ("cpu", "nvme"))
        cached = sum(t.cached_tokens for t in r.turns)
        missed = sum(t.cached_tokens < t.prompt_tokens / 2 for t in r.turns if t.turn > 1)
        per_run.append({
            "ttft_p50_ms": percentile(returning, 0.5) if returning else float("nan"),
            "ttft_p95_ms": percentile(returning, 0.95) if returning else float("nan"),
            "first_turn_ttft_p50_ms": percentile(first, 0.5),
            "first_turn_ttft_p95_ms": percentile(first, 0.95),
            "all_turn_ttft_p50_ms": percentile(every, 0.5),
            "all_turn_ttft_p95_ms": percentile(every, 0.95),
            "tok_s": r.tok_s,
            "wall_s": r.wall_s,
            "prompt_tokens": sum(t.prompt_tokens for t in r.turns),
            "cached_tokens": cached,
            "hit_tokens_by_tier": {"device": cached - cpu - nvme, "cpu": cpu, "nvme": nvme},
            "nvme_read_tokens": r.tier_hits["nvme_reads"] * block_size,  # served + prefetched
            # Returning turns that reused under half their prompt (history lost or not reused).
            "returning_turns_missed": missed,
        })  # fmt: skip
    keys = [k for k in per_run[0] if k != "hit_tokens_by_tier"]
    summary: dict[str, Any] = {k: statistics.median(p[k] for p in per_run) for k in keys}
    summary["hit_tokens_by_tier"] = {
        t: statistics.median(p["hit_tokens_by_tier"][t] for p in per_run) for t in ("device", "cpu", "nvme")
    }
    return summary


def report(summaries: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    base = summaries.get("recompute")
    print(
        f"\nmultiturn_bench: {args.conversations} conversations x {args.turns} turns, "
        f"medians over {args.runs} run(s); TTFT in ms (ret = returning turns)"
    )
    head = (
        "mode",
        "ret p50",
        "ret p95",
        "1st p50",
        "tok/s",
        "ret/rc",
        "tok/rc",
        "missed",
        "hit tok dev/cpu/nvme",
    )
    print(
        f"{head[0]:<11}{head[1]:>9}{head[2]:>9}{head[3]:>9}{head[4]:>8}{head[5]:>8}{head[6]:>8}{head[7]:>8}"
        f"  {head[8]}"
    )
    for mode, s in summaries.items():
        ttft_ratio = s["ttft_p50_ms"] / base["ttft_p50_ms"] if base else float("nan")
        tok_ratio = s["tok_s"] / base["tok_s"] if base else float("nan")
        hits = "/".join(str(int(s["hit_tokens_by_tier"][t])) for t in ("device", "cpu", "nvme"))
        missed = s["returning_turns_missed"]
        print(
            f"{mode:<11}{s['ttft_p50_ms']:>9.0f}{s['ttft_p95_ms']:>9.0f}{s['first_turn_ttft_p50_ms']:>9.0f}"
            f"{s['tok_s']:>8.2f}{ttft_ratio:>8.2f}{tok_ratio:>8.2f}{missed:>8.0f}  {hits}"
        )
    print(
        "missed = returning turns that reused under half their prompt; a negative device count means"
        " blocks the tiers served that the worker did not reuse"
    )
    targets: dict[str, Any] = {}
    if base and "hmt" in summaries:
        hmt = summaries["hmt"]
        targets = {
            "ttft_ratio": hmt["ttft_p50_ms"] / base["ttft_p50_ms"],
            "ttft_met": hmt["ttft_p50_ms"] <= TTFT_TARGET * base["ttft_p50_ms"],
            "tok_s_ratio": hmt["tok_s"] / base["tok_s"],
            "tok_s_met": hmt["tok_s"] >= base["tok_s"],
        }
        print(
            f"targets: returning-turn TTFT p50 hmt/recompute = {targets['ttft_ratio']:.2f} "
            f"(<= {TTFT_TARGET}: {'met' if targets['ttft_met'] else 'NOT met'}); "
            f"tok/s hmt/recompute = {targets['tok_s_ratio']:.2f} "
            f"(>= 1: {'met' if targets['tok_s_met'] else 'NOT met'})"
        )
    data: dict[str, Any] = {
        k: {m: s[k] for m, s in summaries.items()}
        for k in ("ttft_p50_ms", "ttft_p95_ms", "tok_s", "hit_tokens_by_tier")
    }
    for k in ("first_turn_ttft_p50_ms", "first_turn_ttft_p95_ms", "all_turn_ttft_p50_ms",
              "all_turn_ttft_p95_ms", "wall_s", "prompt_tokens", "cached_tokens",
              "returning_turns_missed", "nvme_read_tokens"):  # fmt: skip
        data[k] = {m: s[k] for m, s in summaries.items()}
    data["targets"] = targets
    return data


def tier_block_bytes(model_dir: Path, block_size: int, codec: str) -> int:
    """Bytes of one block of this model in a tier codec (the first block keeps sink tokens)."""
    import torch

    from wicore.kv.codecs import codec_from_name, encode

    cfg = json.loads((model_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv = torch.randn(cfg["num_hidden_layers"], 2, block_size, cfg["num_key_value_heads"], head_dim)
    return encode(kv, codec_from_name(codec), sink_tokens=0).nbytes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--model", default="smollm2")
    add("--conversations", type=int, default=8)
    add("--turns", type=int, default=3)
    add("--context-tokens", type=int, default=1000, help="each conversation's opening document")
    add("--message-tokens", type=int, default=40, help="each user message")
    add("--max-tokens", type=int, default=32, help="each reply (ignore_eos: exactly this many)")
    add(
        "--concurrency",
        type=int,
        default=1,
        help="requests in flight (turns of a conversation stay in order)",
    )
    add("--order", choices=("shuffle", "round-robin"), default="shuffle", help="within each round")
    add("--kv-cache-mib", type=int, default=128, help="device KV pool (worker.kv_cache_bytes)")
    add("--hmt-cpu-conversations", type=float, default=3.0, help="hmt: CPU tier sized for this many")
    add("--large-tier-mib", type=int, default=1024, help="the tiers that should not fill up")
    add(
        "--modes", default=",".join(MODES),
        help=f"comma-separated subset of {','.join([*MODES, *POLICY_MODES])} (hmt_lru: hmt with LRU tiers)",
    )  # fmt: skip
    add("--runs", type=int, default=1)
    add("--seed", type=int, default=7)
    add("--block-size", type=int, default=16)
    add("--max-batched-tokens", type=int, default=512)
    add("--keep-state", help="keep each stack's state dir (logs, NVMe files) under this folder")
    add("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="more settings, every stack")
    add("--json")
    args = parser.parse_args()
    args.modes = [m for m in args.modes.split(",") if m]
    if unknown := set(args.modes) - set(MODES) - set(POLICY_MODES):
        parser.error(f"unknown modes {sorted(unknown)}")
    return args


def main() -> int:
    args = parse_args()
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    conversations = make_conversations(tokenizer, args)
    order = make_order(args)
    # A conversation's blocks at its last turn: every message, every reply but the last.
    tokens = sum(len(tokenizer(p).input_ids) for p in conversations[0]) + (args.turns - 1) * args.max_tokens
    blocks = -(-tokens // args.block_size)
    args.hmt_cpu_bytes = int(
        args.hmt_cpu_conversations * blocks * tier_block_bytes(model_dir, args.block_size, "q8")
    )
    print(
        f"{len(order)} requests; a conversation ends at ~{tokens} tokens = {blocks} blocks; "
        f"hmt CPU tier {args.hmt_cpu_bytes / MiB:.1f} MiB (q8)",
        file=sys.stderr,
    )

    started = time.perf_counter()
    results: dict[str, list[ModeRun]] = {m: [] for m in args.modes}
    for run in range(args.runs):
        shift = run % len(args.modes)
        for mode in args.modes[shift:] + args.modes[:shift]:
            results[mode].append(run_mode(mode, run, model_dir, conversations, order, args))
    summaries = {m: summarise(runs, args.block_size) for m, runs in results.items()}
    data = report(summaries, args)
    runtime = time.perf_counter() - started
    print(
        f"runtime {runtime:.0f} s (numbers are noisy: other processes share these 2 cores)", file=sys.stderr
    )
    params = {k: v for k, v in vars(args).items() if k != "json"}
    data["params"] = params | {"requests": len(order), "conversation_blocks": blocks, "runtime_s": runtime}
    data["order"] = order
    data["runs"] = {
        m: [{"wall_s": r.wall_s, "tier_hits": r.tier_hits, "tier_stats": r.tier_stats, "costs": r.costs,
             "turns": [asdict(t) for t in r.turns]} for r in runs]
        for m, runs in results.items()
    }  # fmt: skip
    write_json(args.json, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
