"""The memory tiers in one run: codec speed, tier put/get speed against raw copies and raw
file I/O of the same bytes, and the eviction policies on a replayed multi-tenant trace.

    python benchmark/tier_bench.py [--blocks 256] [--runs 3] [--repeats 100] --json OUT

- codec_mb_s: MB/s of fp16 input per codec, encode and decode, one thread
  (`codec_bench.bench_block`, SmolLM2's block [30, 2, 16, 3, 64]), with a plain
  memory copy of the same tensor timed in the same run.
- tier_gb_s: `--blocks` SmolLM2 blocks already in the tier's codec (q8 for the CPU
  tier, q4 for NVMe, as a worker would send them), through `TierManager` without
  Redis (the Redis mirror is one pipeline per RPC, off this path):
    cpu put   = what PutBlocks does per block after the wire: verify the checksum,
                copy the payload out of the receive buffer, index it (manager.put);
    cpu get   = manager.get, then the copy into the outgoing message;
    memcpy_in = the copy alone into memory that is kept (fresh pages, as a put's);
    memcpy_out = the copy alone out of stored blocks (a get's);
    nvme put  = manager.put into an NVMe-only tier: temp file, write, fsync, rename,
                folder fsync;  raw write = open, write, fsync, close of the same bytes;
    nvme get  = manager.get of --get-batch blocks at a time (a prefix, as a worker asks
                for it): read, verify both checksums;  raw read = open, read, one by one.
  Reads hit the page cache for both (dropping it needs root); the ratio is what
  the tier's own work costs on top of the same I/O.
- policy: `policy_replay.replay_all` (A²CR vs LRU vs LFU on its documented trace),
  medians over --seeds.
Speeds are medians of --runs; the JSON holds every run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from codec_bench import BLOCKS, bench_block, make_block
from common import write_json
from policy_replay import replay_all

from wicore.config import A2crConfig, TierConfig
from wicore.kv.block import Codec, EncodedBlock
from wicore.kv.codecs import encode
from wicore.kv.hashing import BlockHash, payload_checksum
from wicore.tier.manager import TierManager
from wicore.tier.nvme import keep_freed_memory

GiB = 1 << 30


def make_blocks(count: int, codec: Codec) -> list[tuple[BlockHash, EncodedBlock]]:
    base = make_block(BLOCKS["smollm2"])
    blocks = []
    for i in range(count):
        kv = base + 0.01 * i  # distinct payloads, same statistics
        blocks.append((BlockHash(f"{i + 1:032x}"), encode(kv, codec)))
    return blocks


async def time_cpu(blocks: list[tuple[BlockHash, EncodedBlock]]) -> dict[str, float]:
    config = TierConfig(cpu_capacity_bytes=4 * GiB, cpu_codec=Codec.Q8, nvme_capacity_bytes=0)
    manager = TierManager(config, A2crConfig(), None, None)
    received = [(h, bytearray(b.payload), b) for h, b in blocks]  # as the chunk assembler holds them
    total = sum(b.nbytes for _, b in blocks)

    start = time.perf_counter()
    for h, buffer, b in received:
        if payload_checksum(buffer) != b.header.checksum:
            raise AssertionError("checksum")
        await manager.put([(h, EncodedBlock(b.header, bytes(buffer)))])  # as ChunkAssembler builds it
    put_s = time.perf_counter() - start

    start = time.perf_counter()
    for h, _, _ in received:
        ((_, block, _),) = await manager.get([h])
        bytes(memoryview(block.payload)[:])  # the copy into the outgoing chunk
    get_s = time.perf_counter() - start

    kept = []  # the copy a put makes is kept, so it faults in fresh pages: so does this one
    start = time.perf_counter()
    for _, buffer, _ in received:
        kept.append(bytes(buffer))
    copy_s = time.perf_counter() - start
    start = time.perf_counter()
    for payload in kept:
        bytes(memoryview(payload)[:])
    copy_out_s = time.perf_counter() - start
    await manager.shutdown()
    return {
        "put": total / put_s / 1e9,
        "get": total / get_s / 1e9,
        "memcpy_in": total / copy_s / 1e9,
        "memcpy_out": total / copy_out_s / 1e9,
    }


async def time_nvme(blocks: list[tuple[BlockHash, EncodedBlock]], root: Path, batch: int) -> dict[str, float]:
    config = TierConfig(cpu_capacity_bytes=0, nvme_capacity_bytes=64 * GiB, nvme_codec=Codec.Q4)
    manager = TierManager(config, A2crConfig(), None, root / "tier")
    total = sum(b.nbytes for _, b in blocks)

    start = time.perf_counter()
    for h, b in blocks:
        await manager.put([(h, b)])
    put_s = time.perf_counter() - start
    hashes = [h for h, _ in blocks]
    start = time.perf_counter()
    for i in range(0, len(hashes), batch):
        assert len(await manager.get(hashes[i : i + batch])) == len(hashes[i : i + batch])
    get_s = time.perf_counter() - start
    await manager.shutdown()

    raw = root / "raw"
    raw.mkdir()
    start = time.perf_counter()
    for h, b in blocks:
        with open(raw / h, "wb") as f:
            f.write(b.payload)
            f.flush()
            os.fsync(f.fileno())
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    for h, _ in blocks:
        with open(raw / h, "rb", buffering=0) as f:
            f.read()
    read_s = time.perf_counter() - start
    return {
        "put": total / put_s / 1e9,
        "get": total / get_s / 1e9,
        "raw_write_fsync": total / write_s / 1e9,
        "raw_read": total / read_s / 1e9,
    }


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blocks", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--get-batch", type=int, default=16, help="NVMe blocks per get (a prefix)")
    parser.add_argument("--repeats", type=int, default=100, help="codec timings per median")
    parser.add_argument("--seeds", type=int, default=3, help="policy replays per policy")
    parser.add_argument("--cpu-blocks", type=int, default=500)
    parser.add_argument("--nvme-blocks", type=int, default=4000)
    parser.add_argument("--dir", default=None, help="where NVMe files go (default: a temp dir)")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()  # as the tier process does

    codecs = bench_block(make_block(BLOCKS["smollm2"]), args.repeats)
    print(f"codecs, SmolLM2 block fp16, one thread; memcpy {codecs['memcpy_mb_s']:.0f} MB/s")
    print(f"  {'codec':6}{'encode MB/s':>13}{'decode MB/s':>13}{'x memcpy (enc/dec)':>22}")
    for codec, speed in codecs["codec_mb_s"].items():
        enc, dec = speed["encode"] / codecs["memcpy_mb_s"], speed["decode"] / codecs["memcpy_mb_s"]
        print(f"  {codec:6}{speed['encode']:13.0f}{speed['decode']:13.0f}{enc:>14.2f} / {dec:.2f}")

    q8, q4 = make_blocks(args.blocks, Codec.Q8), make_blocks(args.blocks, Codec.Q4)
    cpu_runs, nvme_runs = [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            cpu_runs.append(asyncio.run(time_cpu(q8)))
            nvme_runs.append(asyncio.run(time_nvme(q4, Path(tmp), args.get_batch)))
    cpu, nvme = median_of(cpu_runs), median_of(nvme_runs)
    print(f"\ntiers, {args.blocks} blocks (q8 {q8[0][1].nbytes} B, q4 {q4[0][1].nbytes} B each), GB/s")
    slower_put, slower_get = cpu["memcpy_in"] / cpu["put"], cpu["memcpy_out"] / cpu["get"]
    print(f"  cpu   put {cpu['put']:.2f} vs memcpy {cpu['memcpy_in']:.2f} ({slower_put:.2f}x);"
          f"  get {cpu['get']:.2f} vs memcpy {cpu['memcpy_out']:.2f} ({slower_get:.2f}x)")  # fmt: skip
    print(f"  nvme  put {nvme['put']:.3f} vs raw write+fsync {nvme['raw_write_fsync']:.3f}"
          f" ({nvme['raw_write_fsync'] / nvme['put']:.2f}x);  get {nvme['get']:.2f} vs raw read"
          f" {nvme['raw_read']:.2f} ({nvme['raw_read'] / nvme['get']:.2f}x)")  # fmt: skip

    replays = [replay_all(args.cpu_blocks, args.nvme_blocks, seed) for seed in range(args.seeds)]
    policy: dict[str, Any] = {
        key: {p: statistics.median(r[key][p] for r in replays) for p in ("a2cr", "lru", "lfu")}
        for key in ("hit_rate", "bytes_moved")
    }
    hit, moved = policy["hit_rate"], policy["bytes_moved"]
    sizes = f"{args.cpu_blocks} CPU / {args.nvme_blocks} NVMe blocks"
    print(f"\npolicy replay, medians of {args.seeds} seeds ({sizes})")
    for p in ("a2cr", "lru", "lfu"):
        print(f"  {p:5} hit rate {hit[p]:.4f}  bytes moved {moved[p] / 1e9:.2f} GB")
    policy["a2cr_minus_lru_hit_rate"] = round(hit["a2cr"] - hit["lru"], 4)
    print(f"  A²CR - LRU hit rate: {policy['a2cr_minus_lru_hit_rate']:+.4f}")

    write_json(
        args.json,
        {
            "codec_mb_s": {
                c: {"encode": s["encode"], "decode": s["decode"]} for c, s in codecs["codec_mb_s"].items()
            },
            "memcpy_mb_s": codecs["memcpy_mb_s"],
            "tier_gb_s": {"cpu": cpu, "nvme": nvme},
            "policy": policy,
            "runs": {"cpu": cpu_runs, "nvme": nvme_runs, "policy": replays, "codecs": codecs},
            "params": {
                "blocks": args.blocks,
                "runs": args.runs,
                "seeds": args.seeds,
                "cpu_blocks": args.cpu_blocks,
                "nvme_blocks": args.nvme_blocks,
                "loadavg_1m": round(os.getloadavg()[0], 2),
                "cpus": os.cpu_count(),
            },
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
