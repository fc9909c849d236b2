"""Decode attention over a shared prefix: the native kernel against torch's, in one run.

    python benchmark/prefix_attention.py [--prefix-tokens 448,3584] [--sequences 16] \\
        [--heads 9 --kv-heads 3 --head-dim 64] [--layers 30] [--runs 5] [--scattered] --json OUT

Sequences that share a prefix (prefix-cache hits of one prompt) attend it once for all of them,
and the result is merged by log-sum-exp into each one's attention over its own keys. This times
that part of a decode step, for every layer of a model (a pool per layer, so no layer finds the
previous one's keys in cache), two ways over the same pool and queries:

  - native: `PagedDecode.merge_prefixes` (csrc/paged_attention.c), what the `paged` backend's
    decode steps run;
  - torch:  `cascade.prefix_attention` + `cascade.merge`, torch's CPU flash attention over the
    prefix (a view of the pool where its blocks are consecutive, a copy where --scattered):
    the `cascade` backend's path, and the `paged` backend's before the native kernel.

It prints, per prefix length, the median time of all layers, the arithmetic rate (two products
of rows x keys x head dim per KV head, rows = sequences x query heads per KV head), the ratio
torch / native, and the largest difference between the two outputs. The defaults are SmolLM2's
shapes (9 query heads over 3 KV heads of 64, 30 layers) at the engine benchmark's 16 sequences.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_seconds, write_json
from serving import machine, markdown_table

from wicore.worker.cascade import Part, PrefixTables, merge, prefix_attention
from wicore.worker.native import decode_kernel
from wicore.worker.paged_attention import KVPool

BLOCK = 16


def measure(args: argparse.Namespace, tokens: int) -> dict[str, float]:
    kernel = decode_kernel()
    if kernel is None:
        raise SystemExit("prefix_attention: the native kernels do not build or load here")
    generator = torch.Generator().manual_seed(tokens)
    s, heads, kv_heads, dim = args.sequences, args.heads, args.kv_heads, args.head_dim
    blocks = -(-tokens // BLOCK)
    pool = KVPool(args.layers, blocks, BLOCK, kv_heads, dim, torch.float32, torch.device("cpu"))
    for t in (*pool.keys, *pool.values):
        t.copy_(torch.randn(t.shape, generator=generator))
    ids = torch.randperm(blocks, generator=generator) if args.scattered else torch.arange(blocks)
    prefixes = PrefixTables.of([(range(s), ids.tolist())])
    assert prefixes is not None
    ends = torch.full((s,), blocks * BLOCK + 1, dtype=torch.long)  # each query follows the prefix
    nothing = torch.zeros(1, dtype=torch.long)
    part = Part(
        None,
        nothing,
        0,
        1,
        (ends - 1)[:, None],
        ends,
        prefix_ids=ids,
        prefix_first=None if args.scattered else 0,
    )
    query = torch.randn(s, heads, dim, generator=generator)
    own = torch.randn(s, heads, dim, generator=generator)  # stand-ins for each row's own-keys part
    own_lse = torch.randn(s, heads, generator=generator)
    scale = dim**-0.5

    def native() -> torch.Tensor:
        for layer in range(args.layers):
            out, lse = own.clone(), own_lse.clone()
            kernel.merge_prefixes(
                query, out, lse, prefixes, pool.keys[layer], pool.values[layer], ends, BLOCK, None, scale
            )
        return out

    def through_torch() -> torch.Tensor:
        q = query.view(s, kv_heads, heads // kv_heads, dim)
        for layer in range(args.layers):
            out, _ = merge(
                own.view(q.shape),
                own_lse.view(q.shape[:3]),
                *prefix_attention(q, part, pool, layer, scale, None, 1),
            )
        return out.reshape(s, heads, dim)

    difference = (native() - through_torch()).abs().max().item()
    flops = 2 * 2 * s * heads * blocks * BLOCK * dim * args.layers  # per query head: q.K and p.V
    native_s, torch_s = median_seconds(native, args.runs), median_seconds(through_torch, args.runs)
    return {
        "prefix_tokens": blocks * BLOCK,
        "native_s": native_s,
        "torch_s": torch_s,
        "native_gflop_s": flops / native_s / 1e9,
        "torch_gflop_s": flops / torch_s / 1e9,
        "ratio": torch_s / native_s,
        "max_abs_difference": difference,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix-tokens", default="448,3584", help="comma-separated prefix lengths")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--scattered", action="store_true", help="the prefix's blocks in random order")
    parser.add_argument("--json", help="where to write the results")
    args = parser.parse_args()
    rows = [measure(args, int(n)) for n in args.prefix_tokens.split(",")]
    print(f"prefix_attention: {args.sequences} sequences, {args.layers} layers, medians of {args.runs} runs")
    print(
        markdown_table(
            [
                "prefix tokens",
                "native ms",
                "torch ms",
                "native GFLOP/s",
                "torch GFLOP/s",
                "torch/native",
                "diff",
            ],
            [
                [
                    r["prefix_tokens"],
                    r["native_s"] * 1e3,
                    r["torch_s"] * 1e3,
                    r["native_gflop_s"],
                    r["torch_gflop_s"],
                    r["ratio"],
                    r["max_abs_difference"],
                ]
                for r in rows
            ],
        )
    )
    write_json(args.json, {"machine": machine(), "params": vars(args), "results": rows})


if __name__ == "__main__":
    main()
