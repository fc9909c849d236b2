"""How close a decode step comes to this machine's memory bandwidth.

    python benchmark/decode_bandwidth.py --model smollm2 [--batches 1,16] [--prompt-tokens 128] \\
        [--steps 32] [--runs 3] [--set worker.dtype=bfloat16 ...] --json OUT

Decode reads every weight once per step (and each sequence's K/V), so at small batch its
speed limit is bytes / memory bandwidth. This prints both, measured in the same run:

  - the machine: read bandwidth (a sum over a --peak-mib buffer, far larger than the
    last-level cache, all threads; the median of 5 x --runs) and copy bandwidth (read +
    write, over 5 x --runs copies);
  - per batch size: the paged engine's decode step (the model as a worker loads it, with
    --set applied) and transformers' own decode step (`generate` over the same prompts,
    the time between tokens) as the baseline, median over --steps steps of --runs runs;
    the bytes a step must read (every weight once as stored, the embedding table only as
    the LM head, each sequence's K/V); GB/s achieved; its share of the read bandwidth;
    and the step time the read bandwidth alone would allow.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_prompts, parse_settings, resolve_model_dir, write_json
from gpu_check import copy_peak, decode_step_seconds, step_bytes
from serving import machine, markdown_table


def read_gb_s(nbytes: int, runs: int) -> float:
    """GB/s of summing a buffer of `nbytes` (a read of each byte once)."""
    buffer = torch.ones(nbytes // 4, dtype=torch.float32)
    buffer.sum()
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        buffer.sum()
        seconds.append(time.perf_counter() - start)
    return nbytes / statistics.median(seconds) / 1e9


class TokenClock:
    """A transformers streamer that notes when each generated token is produced."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())  # the first call is the prompt

    def end(self) -> None:
        pass


def hf_step_seconds(model: Any, prompts: list[list[int]], steps: int) -> list[float]:
    """transformers' decode steps: the time between consecutive tokens of a static-batch `generate`."""
    ids = torch.tensor(prompts)
    clock = TokenClock()
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=steps + 2,
        min_new_tokens=steps + 2,
        do_sample=False,
        pad_token_id=0,
        streamer=clock,
    )
    tokens = clock.times[1:]  # after the prompt
    return [b - a for a, b in itertools.pairwise(tokens[1:])]  # the first decode step left out


def equal_length_prompts(tokenizer: Any, batch: int, tokens: int) -> list[list[int]]:
    ids = [list(tokenizer(p).input_ids) for p in make_prompts(tokenizer, batch, tokens, 0)]
    width = min(map(len, ids))
    return [p[:width] for p in ids]  # no padding in the static batch


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--peak-mib", type=int, default=2048)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--json")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",") if b]
    if not batches or min(batches) < 1:
        parser.error("--batches: comma-separated sizes >= 1")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wicore.config import load_config
    from wicore.worker.app import engine_config, load_model
    from wicore.worker.paged_engine import PagedEngine

    peak = {
        "read_gb_s": read_gb_s(args.peak_mib << 20, 5 * args.runs),
        "copy_gb_s": copy_peak(torch.device("cpu"), args.peak_mib << 20, 5 * args.runs),
    }
    print(f"memory: read {peak['read_gb_s']:.1f} GB/s, copy {peak['copy_gb_s']:.1f} GB/s", file=sys.stderr)

    model_dir = resolve_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = {b: equal_length_prompts(tokenizer, b, args.prompt_tokens) for b in batches}
    prompt_tokens = {b: len(p[0]) for b, p in prompts.items()}

    config = load_config(None, {}, {"worker.model": str(model_dir)} | parse_settings(args.set))
    loaded = load_model(config)
    engine = PagedEngine(loaded.model, engine_config(config, loaded.model), loaded.fingerprint)
    decode_step_seconds(engine, prompts[batches[0]][:1], 2, "warm")
    engine_steps = {b: [] for b in batches}
    for run in range(args.runs):
        for b in batches:
            # A fresh engine: no run decodes from the previous one's cached prompts.
            engine = PagedEngine(loaded.model, engine_config(config, loaded.model), loaded.fingerprint)
            engine_steps[b] += decode_step_seconds(engine, prompts[b], args.steps, f"r{run}b{b}")
    wicore_bytes = {b: step_bytes(loaded.model, b, prompt_tokens[b], args.steps) for b in batches}
    del loaded, engine

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf_steps = {b: [] for b in batches}
    with torch.inference_mode():
        hf_step_seconds(hf, prompts[batches[0]][:1], 2)  # warm-up
        for _ in range(args.runs):
            for b in batches:
                hf_steps[b] += hf_step_seconds(hf, prompts[b], args.steps)
    hf_bytes = {b: step_bytes(hf, b, prompt_tokens[b], args.steps) for b in batches}

    results: dict[str, Any] = {}
    for b in batches:
        row = {}
        for name, steps, nbytes in (
            ("wicore_engine", engine_steps[b], wicore_bytes[b]),
            ("hf_generate", hf_steps[b], hf_bytes[b]),
        ):
            step = statistics.median(steps)
            gb_s = nbytes / step / 1e9
            row[name] = {
                "step_ms": 1000 * step,
                "tok_s": b / step,
                "bytes_read": int(nbytes),
                "gb_s": gb_s,
                "of_read_peak": gb_s / peak["read_gb_s"],
                "bound_ms": 1000 * nbytes / (peak["read_gb_s"] * 1e9),
            }
        row["speedup"] = row["hf_generate"]["step_ms"] / row["wicore_engine"]["step_ms"]
        results[f"batch_{b}"] = row

    headers = ("batch", "mode", "step ms", "tok/s", "MB read", "GB/s", "of read peak", "bandwidth-bound ms")
    rows = [
        (
            b,
            name,
            f"{r['step_ms']:.1f}",
            f"{r['tok_s']:.1f}",
            f"{r['bytes_read'] / 1e6:.0f}",
            f"{r['gb_s']:.1f}",
            f"{100 * r['of_read_peak']:.0f}%",
            f"{r['bound_ms']:.1f}",
        )
        for b in batches
        for name, r in results[f"batch_{b}"].items()
        if name != "speedup"
    ]
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"\n## decode bandwidth, {args.model}, {torch.get_num_threads()} threads ({capability})\n")
    print(f"memory: read {peak['read_gb_s']:.1f} GB/s, copy (read + write) {peak['copy_gb_s']:.1f} GB/s\n")
    print(markdown_table(headers, rows))
    for b in batches:
        print(f"batch {b}: engine step {results[f'batch_{b}']['speedup']:.2f}x transformers'")
    params = vars(args) | {
        "threads": torch.get_num_threads(),
        "cpu_capability": capability,
        "torch": torch.__version__,
        "prompt_tokens_exact": prompt_tokens,
        "machine": machine(),
    }
    write_json(
        args.json, {"benchmark": "decode_bandwidth", "params": params, "peak": peak, "results": results}
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
