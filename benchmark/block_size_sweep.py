"""Chooses the default KV block size by measurement: the engine's throughput and
TTFT on the engine_bench workload for several block sizes, interleaved in one
process (so machine noise hits every size alike), medians over --runs.

    python benchmark/block_size_sweep.py --sizes 8,16,32,64 --runs 3 --json OUT
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
    parser.add_argument("--sizes", default="8,16,32,64")
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

    sizes = [int(s) for s in args.sizes.split(",")]
    model_dir = resolve_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = make_prompts(tokenizer, args.requests, args.prompt_tokens, args.shared_prefix_tokens)
    ids = [list(tokenizer(p).input_ids) for p in prompts]
    loaded = load_model(load_config(None, {}, {"worker.model": str(model_dir)}))
    results: dict[int, list[tuple[float, float]]] = {s: [] for s in sizes}
    for run in range(args.runs):
        for size in sizes:
            config = load_config(None, {}, {"worker.model": str(model_dir), "worker.block_size": size})
            warm = PagedEngine(loaded.model, engine_config(config, loaded.model), loaded.fingerprint)
            run_engine(warm, ids[:2], 2, f"w{run}-{size}")  # warm-up, excluded
            engine = PagedEngine(loaded.model, engine_config(config, loaded.model), loaded.fingerprint)
            r = run_engine(engine, ids, args.new_tokens, f"r{run}-{size}")
            results[size].append((r.tok_s, r.ttft_p50_ms))
            print(f"run {run} block {size}: {r.tok_s:.1f} tok/s", file=sys.stderr)
    print(f"\n{'block size':<12}{'tok/s':>10}{'ttft p50 ms':>14}{'ratio':>8}")
    base = statistics.median(t for t, _ in results[sizes[0]])
    table = {}
    for size in sizes:
        tok_s = statistics.median(t for t, _ in results[size])
        ttft = statistics.median(f for _, f in results[size])
        table[size] = {"tok_s": tok_s, "ttft_p50_ms": ttft}
        print(f"{size:<12}{tok_s:>10.1f}{ttft:>14.0f}{tok_s / base:>8.2f}")
    write_json(args.json, {"params": vars(args), "by_block_size": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
