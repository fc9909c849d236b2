"""Engine throughput and TTFT: WiCore (in-process and through the gRPC stack)
against transformers' sequential `generate`, static batched `generate` and its
own continuous batching (`generate_batch`), on identical prompts, fp32, greedy,
exactly --new-tokens each, all requests arriving at once.

    python benchmark/engine_bench.py --model smollm2 --requests 16 --prompt-tokens 128 \\
        --new-tokens 64 [--shared-prefix-tokens N] --runs 3 --json OUT \\
        [--set worker.attention_backend=gather ...]

`--set` applies to the engine and to the stack (not to transformers' baselines).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    ModeResult,
    make_prompts,
    parse_settings,
    percentile,
    report,
    resolve_model_dir,
    running_stack,
    write_json,
)

MODES = ("wicore_engine", "wicore_stack", "hf_sequential", "hf_static_batch", "hf_generate_batch")


class FirstTokenClock:
    """A transformers streamer that notes when the first generated token arrives."""

    def __init__(self) -> None:
        self.calls = 0
        self.first: float | None = None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:  # call 1 is the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def load_hf(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def run_hf_sequential(model: Any, prompt_ids: list[list[int]], new: int) -> ModeResult:
    start = time.perf_counter()
    ttfts = []
    for ids in prompt_ids:
        clock = FirstTokenClock()
        model.generate(
            torch.tensor([ids]), max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=clock
        )
        ttfts.append((clock.first or time.perf_counter()) - start)
    wall = time.perf_counter() - start
    return ModeResult(len(prompt_ids) * new / wall, 1000 * percentile(ttfts, 0.5))


def run_hf_static(model: Any, tokenizer: Any, prompt_ids: list[list[int]], new: int) -> ModeResult:
    width = max(map(len, prompt_ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
    clock = FirstTokenClock()
    start = time.perf_counter()
    model.generate(
        ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=clock,
        pad_token_id=pad,
    )  # fmt: skip
    end = time.perf_counter()
    first = clock.first or start
    decode = len(prompt_ids) * (new - 1) / (end - first) if end > first else 0.0
    return ModeResult(len(prompt_ids) * new / (end - start), 1000 * (first - start), {"decode_tok_s": decode})


def run_hf_generate_batch(model: Any, prompt_ids: list[list[int]], new: int, block_size: int) -> ModeResult:
    from transformers import ContinuousBatchingConfig, GenerationConfig

    total = sum(len(p) + new for p in prompt_ids)
    cb = ContinuousBatchingConfig(
        page_size=block_size, num_blocks=total // block_size + len(prompt_ids) + 8, max_batch_tokens=512
    )
    gen = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=-1)
    start = time.perf_counter()
    out = model.generate_batch(
        prompt_ids, generation_config=gen, continuous_batching_config=cb, record_timestamps=True
    )
    wall = time.perf_counter() - start
    produced = sum(len(r.generated_tokens) for r in out.values())
    ttfts = [
        (r.timestamps[0] - start) if getattr(r, "timestamps", None) else wall for r in out.values()
    ]  # fmt: skip
    return ModeResult(produced / wall, 1000 * percentile(ttfts, 0.5), {"tokens": produced})


def run_engine(engine: Any, prompt_ids: list[list[int]], new: int, tag: str) -> ModeResult:
    from wicore.worker.engine_types import EngineRequest

    start = time.perf_counter()
    for i, ids in enumerate(prompt_ids):
        engine.add_request(EngineRequest(f"{tag}-{i}", ids, new))
    first: dict[str, float] = {}
    steps: list[tuple[float, int]] = []  # (when, tokens) per step
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            first.setdefault(out.request_id, now)
        steps.append((now, sum(len(out.new_token_ids) for out in outputs)))
    end = time.perf_counter()
    produced = sum(n for _, n in steps)
    ttfts = [t - start for t in first.values()]
    # Decode alone: the tokens of the steps after every request had its first token.
    all_started = max(first.values())
    decode = sum(n for t, n in steps if t > all_started) / (end - all_started) if end > all_started else 0.0
    return ModeResult(
        produced / (end - start), 1000 * percentile(ttfts, 0.5), {"tokens": produced, "decode_tok_s": decode}
    )


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_soak(engine: Any, tokenizer: Any, total: int, wave: int) -> dict[str, Any]:
    """`total` requests through one engine in waves; resident memory after each wave."""
    import random

    from common import WORDS

    rng = random.Random(7)
    samples = []
    done = 0
    while done < total:
        batch = []
        for _ in range(min(wave, total - done)):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(16, 160)))
            batch.append(list(tokenizer(text).input_ids))
        run_engine(engine, batch, 8, f"soak{done}")
        done += len(batch)
        samples.append((done, round(rss_mib(), 1)))
        engine.pool.check_integrity()
    first, last = samples[0][1], samples[-1][1]
    kv_bytes = engine.runner.pool.nbytes
    print(
        f"soak: {total} requests, RSS {first:.0f} -> {last:.0f} MiB, KV pool {kv_bytes / 2**20:.0f} MiB",
        file=sys.stderr,
    )
    return {
        "requests": total,
        "rss_mib": samples,
        "rss_growth_mib": last - first,
        "kv_pool_mib": kv_bytes / 2**20,
    }


def stack_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings of the benchmarks' stacks (`running_stack`) from their command line."""
    return {
        "worker.block_size": args.block_size, "worker.max_num_batched_tokens": args.max_batched_tokens,
        "redis.namespace": f"bench-{os.getpid()}",
    } | parse_settings(args.set)  # fmt: skip


async def run_stack_once(address: str, prompts: list[str], new: int) -> ModeResult:
    import grpc

    from wicore.v1 import inference_pb2 as pb
    from wicore.v1 import inference_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        warm = pb.GenerateRequest(prompt="warm up", max_tokens=2, ignore_eos=True)
        for _ in range(3):  # the worker may still be registering
            try:
                await stub.Generate(warm)
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(1)
        start = time.perf_counter()

        async def one(prompt: str) -> tuple[float, int]:
            request = pb.GenerateRequest(
                prompt=prompt, max_tokens=new, ignore_eos=True, sampling=pb.SamplingParams(temperature=0)
            )
            first, count = 0.0, 0
            async for msg in stub.GenerateStream(request):
                if msg.token_ids and not first:
                    first = time.perf_counter() - start
                count += len(msg.token_ids)
            return first, count

        done = await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - start
    produced = sum(c for _, c in done)
    return ModeResult(produced / wall, 1000 * percentile([f for f, _ in done], 0.5), {"tokens": produced})


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--shared-prefix-tokens", type=int, default=0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-batched-tokens", type=int, default=512)
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES)
    )
    parser.add_argument("--soak", type=int, default=0, help="also run N short requests and report memory")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--json")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}")

    from transformers import AutoTokenizer

    from wicore.config import load_config
    from wicore.worker.app import engine_config, load_model
    from wicore.worker.paged_engine import PagedEngine

    model_dir = resolve_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = make_prompts(tokenizer, args.requests, args.prompt_tokens, args.shared_prefix_tokens)
    prompt_ids = [list(tokenizer(p).input_ids) for p in prompts]
    new = args.new_tokens
    results: dict[str, list[ModeResult]] = {m: [] for m in modes}

    if "wicore_engine" in modes:
        overrides = {
            "worker.model": str(model_dir),
            "worker.block_size": args.block_size,
            "worker.max_num_batched_tokens": args.max_batched_tokens,
        } | parse_settings(args.set)
        config = load_config(None, {}, overrides)
        loaded = load_model(config)
        for run in range(args.runs):
            # A fresh engine per run: the prefix cache starts empty, as for the baselines.
            engine = PagedEngine(loaded.model, engine_config(config, loaded.model), loaded.fingerprint)
            run_engine(engine, prompt_ids[:2], 4, f"warm{run}")  # warm-up, excluded
            engine = PagedEngine(loaded.model, engine_config(config, loaded.model), loaded.fingerprint)
            results["wicore_engine"].append(run_engine(engine, prompt_ids, new, f"run{run}"))
            print(f"wicore_engine run {run}: {results['wicore_engine'][-1]}", file=sys.stderr)
        if args.soak:
            soak = run_soak(engine, tokenizer, args.soak, args.requests)
        del loaded, engine

    if "wicore_stack" in modes:
        with (
            tempfile.TemporaryDirectory() as tmp,
            running_stack(model_dir, Path(tmp), stack_settings(args)) as stack,
        ):
            for run in range(args.runs):
                # Each run uses prompts the stack has not seen (its prefix cache persists).
                fresh = make_prompts(tokenizer, args.requests, args.prompt_tokens, args.shared_prefix_tokens)
                fresh = [f"{run} {p}" for p in fresh] if run else fresh
                results["wicore_stack"].append(asyncio.run(run_stack_once(stack.gateway, fresh, new)))
                print(f"wicore_stack run {run}: {results['wicore_stack'][-1]}", file=sys.stderr)

    hf_modes = [m for m in modes if m.startswith("hf_")]
    if hf_modes:
        model = load_hf(model_dir)
        model.generate(torch.tensor([prompt_ids[0]]), max_new_tokens=2, do_sample=False)  # warm-up
        for run in range(args.runs):
            for mode in hf_modes:
                if mode == "hf_sequential":
                    result = run_hf_sequential(model, prompt_ids, new)
                elif mode == "hf_static_batch":
                    result = run_hf_static(model, tokenizer, prompt_ids, new)
                else:
                    if run == 0:  # its warm-up, excluded
                        run_hf_generate_batch(model, prompt_ids[:2], 2, args.block_size)
                    result = run_hf_generate_batch(model, prompt_ids, new, args.block_size)
                results[mode].append(result)
                print(f"{mode} run {run}: {result}", file=sys.stderr)

    params = vars(args) | {"threads": torch.get_num_threads(), "torch": torch.__version__}
    baseline = "hf_static_batch" if "hf_static_batch" in results else modes[0]
    data = report("engine_bench", results, params, baseline)
    if args.soak and "wicore_engine" in modes:
        data["soak"] = soak
    write_json(args.json, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
