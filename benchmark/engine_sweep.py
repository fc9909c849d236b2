"""One engine setting swept on the engine_bench workload: throughput and TTFT per value,
interleaved in one process (so machine noise hits every value alike), medians over
--runs, ratios against the first value.

    python benchmark/engine_sweep.py --setting worker.block_size --values 8,16,32,64 --runs 3
    python benchmark/engine_sweep.py --setting worker.attention_sample_every --values 0,8,1 --runs 5

The first chose the default block size; the second measures the A²CR attention
probe's cost (0 = off, 8 = the default, 1 = every step).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_prompts, resolve_model_dir, write_json
from engine_bench import run_engine


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--setting", default="worker.block_size", help="a dotted worker.* config key")
    parser.add_argument("--values", default="8,16,32,64", help="integers, comma separated")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--shared-prefix-tokens", type=int, default=0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from wicore.config import load_config
    from wicore.worker.app import engine_config, load_model
    from wicore.worker.paged_engine import PagedEngine

    sizes = [int(s) for s in args.values.split(",")]
    model_dir = resolve_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = make_prompts(tokenizer, args.requests, args.prompt_tokens, args.shared_prefix_tokens)
    ids = [list(tokenizer(p).input_ids) for p in prompts]
    loaded = load_model(load_config(None, {}, {"worker.model": str(model_dir)}))
    results: dict[int, list[tuple[float, float]]] = {s: [] for s in sizes}
    for run in range(args.runs):
        for size in sizes:
            config = load_config(None, {}, {"worker.model": str(model_dir), args.setting: size})
            warm = PagedEngine(loaded.model, engine_config(config, loaded.model), loaded.fingerprint)
            run_engine(warm, ids[:2], 2, f"w{run}-{size}")  # warm-up, excluded
            engine = PagedEngine(loaded.model, engine_config(config, loaded.model), loaded.fingerprint)
            r = run_engine(engine, ids, args.new_tokens, f"r{run}-{size}")
            results[size].append((r.tok_s, r.ttft_p50_ms))
            print(f"run {run} {args.setting}={size}: {r.tok_s:.1f} tok/s", file=sys.stderr)
    print(f"\n{args.setting:<34}{'tok/s':>10}{'ttft p50 ms':>14}{'ratio':>8}")
    base = statistics.median(t for t, _ in results[sizes[0]])
    table = {}
    for size in sizes:
        tok_s = statistics.median(t for t, _ in results[size])
        ttft = statistics.median(f for _, f in results[size])
        table[size] = {"tok_s": tok_s, "ttft_p50_ms": ttft}
        print(f"{size:<34}{tok_s:>10.1f}{ttft:>14.0f}{tok_s / base:>8.2f}")
    write_json(args.json, {"params": vars(args), "by_value": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
