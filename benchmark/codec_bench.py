"""KV block codec throughput on one core: encode and decode MB/s of fp16 input bytes per
codec, against a plain `bytes(tensor.numpy())` copy timed in the same run, plus the
compression ratio (input bytes / payload bytes) with the lz4 rule applied, and the minor
page faults per encode/decode call (fresh pages for temporaries; they explain most slow runs).

    python benchmark/codec_bench.py [--repeats 200] [--profile] --json OUT

Blocks are fp16, normal noise with one outlier channel per head (like real keys):
SmolLM2's block (30 layers, 16 tokens, 3 kv heads, head_dim 64) and a Llama-3-8B-sized
one (32 layers, 16 tokens, 8 kv heads, head_dim 128). Times are medians of wall-clock
runs with `torch.set_num_threads(1)`; encode is timed with use_lz4=False, and
"encode+lz4" with the lz4 attempt the tiers make. --profile prints where the time of
q8/q4 goes, per torch op. The JSON's top level holds the SmolLM2 block; "blocks" holds all.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_seconds, write_json

from wicore.kv.codecs import Codec, decode, encode

BLOCKS = {"smollm2": (30, 2, 16, 3, 64), "llama3-8b": (32, 2, 16, 8, 128)}


def make_block(shape: tuple[int, ...]) -> torch.Tensor:
    kv = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    kv[..., 3] += 20.0
    return kv.half()


def faults_per_call(fn: Callable[[], object], repeats: int) -> float:
    """Minor page faults per call: fresh pages for big temporaries (glibc hands freed ones back
    to the OS past its trim threshold) can cost as much as the codec maths."""
    fn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        fn()
    return round((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / repeats, 1)


def bench_block(kv: torch.Tensor, repeats: int) -> dict[str, Any]:
    nbytes = kv.numel() * kv.element_size()

    def mb_s(fn: Callable[[], object]) -> float:
        return round(nbytes / median_seconds(fn, repeats) / 1e6, 1)

    result: dict[str, Any] = {
        "input_bytes": nbytes,
        "codec_mb_s": {},
        "ratio": {},
        "lz4_kept": {},
        "page_faults_per_call": {},
    }
    result["memcpy_mb_s"] = mb_s(lambda: bytes(kv.numpy()))
    for codec in Codec:
        raw = encode(kv, codec, use_lz4=False)
        framed = encode(kv, codec)
        result["codec_mb_s"][codec.value] = {
            "encode": mb_s(partial(encode, kv, codec, use_lz4=False)),
            "decode": mb_s(partial(decode, raw)),
            "encode+lz4": mb_s(partial(encode, kv, codec)),
        }
        result["page_faults_per_call"][codec.value] = {
            "encode": faults_per_call(partial(encode, kv, codec, use_lz4=False), repeats),
            "decode": faults_per_call(partial(decode, raw), repeats),
        }
        result["ratio"][codec.value] = round(nbytes / len(framed.payload), 3)
        result["lz4_kept"][codec.value] = framed.header.lz4
    return result


def print_table(name: str, shape: tuple[int, ...], result: dict[str, Any]) -> None:
    print(f"\n{name} block {list(shape)} fp16, {result['input_bytes'] / 1e3:.0f} kB")
    print(f"  memcpy bytes(tensor.numpy()): {result['memcpy_mb_s']:9.0f} MB/s")
    print(
        f"  {'codec':6} {'encode MB/s':>12} {'decode MB/s':>12} {'enc+lz4 MB/s':>13} {'ratio':>6} lz4"
        "   page faults/call enc dec"
    )
    for codec, speeds in result["codec_mb_s"].items():
        faults = result["page_faults_per_call"][codec]
        print(
            f"  {codec:6} {speeds['encode']:12.0f} {speeds['decode']:12.0f} {speeds['encode+lz4']:13.0f}"
            f" {result['ratio'][codec]:6.3f} {'kept' if result['lz4_kept'][codec] else 'raw ':4}"
            f" {faults['encode']:20.1f} {faults['decode']:5.1f}"
        )


def profile(kv: torch.Tensor, repeats: int) -> None:
    """Self CPU time per torch op for q8 and q4, encode and decode."""
    for codec in (Codec.Q8, Codec.Q4):
        block = encode(kv, codec, use_lz4=False)
        runs: dict[str, Callable[[], object]] = {
            "encode": partial(encode, kv, codec, use_lz4=False),
            "decode": partial(decode, block),
        }
        for label, fn in runs.items():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(repeats):
                    fn()
            print(f"\n{codec.value} {label}: self CPU time per call over {repeats} calls")
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
            print(table)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    one = torch.ones(1)
    blocks = {}
    for name, shape in BLOCKS.items():
        kv = make_block(shape)
        blocks[name] = bench_block(kv, args.repeats)
        print_table(name, shape, blocks[name])
    if args.profile:
        profile(make_block(BLOCKS["smollm2"]), args.repeats)
    params = {
        "blocks": {name: list(shape) for name, shape in BLOCKS.items()},
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "loadavg_1m": round(os.getloadavg()[0], 2),
        # Dispatch cost of one tiny torch op: ~1.5 us on an idle core; q4 encode makes ~40 ops.
        "tiny_op_us": round(median_seconds(lambda: one + one, 2000) * 1e6, 2),
        "cpus": os.cpu_count(),
    }
    write_json(args.json, {**blocks["smollm2"], "blocks": blocks, "params": params})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
