"""Chaos: the NVMe directory fills up (ENOSPC) under load.

The tier's `nvme_dir` is a FS_BYTES tmpfs while its `nvme_capacity_bytes` claims far more,
so the filesystem refuses writes before the tier's own accounting makes room; on the first
ENOSPC the tier takes the bytes it holds as its capacity and evicts to make room from then on.
The CPU level holds CPU_BLOCKS blocks, so spilled blocks demote to NVMe at once, and the
worker's KV pool is small, so every long prompt spills. Distinct long prompts run until
the disk is full and beyond, then the first prompts run again.

Asserted: no request fails, and each repeated prompt gives exactly its first output
(whether its blocks came back from the tier or were recomputed); the tier counts the
refused writes in `Stats.nvme_write_errors`, and they stay a handful while demotions go on;
it leaves no temp file on the full disk and never indexes more bytes than the filesystem
holds; it keeps serving (no restart).
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from wicore.v1 import inference_pb2 as pb
from wicore.v1 import inference_pb2_grpc, tier_pb2, tier_pb2_grpc

from stack import Stack, start_stack, until

BLOCK = 16
BLOCK_BYTES = 2 * 4 * BLOCK * 2 * 16 * 4  # tiny Llama: 4 layers, 2 KV heads of 16, fp32
POOL_BLOCKS = 14  # one long prompt (~170 tokens) at a time: each one spills the one before
CPU_BLOCKS = 4
FS_BYTES = 2 << 20  # about 100 block files (16 KiB + header, in 4 KiB pages)
PROMPTS = 36  # ~9 spilled blocks each: over 300 blocks, three times what the disk holds
REPEATED = 8


def prompt(i: int) -> str:
    return f"{i} " + 3 * f"Prompt number {i} spills its KV cache to the tiers until the disk is full. "


IO_DEPTH = 8  # NVMe writes in flight at once


def settings(nvme_dir: Path) -> dict[str, object]:
    return {
        "worker.kv_cache_bytes": POOL_BLOCKS * BLOCK_BYTES,
        "worker.cpu_kernels": "default",
        "tier.cpu_capacity_bytes": CPU_BLOCKS * BLOCK_BYTES,
        "tier.cpu_codec": "raw",
        "tier.nvme_codec": "raw",
        "tier.nvme_dir": str(nvme_dir),
        "tier.nvme_capacity_bytes": 256 << 20,  # far more than the filesystem
        "tier.io_depth": IO_DEPTH,
        "a2cr_config.cleanup_interval": 0.5,
    }


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A FS_BYTES tmpfs mounted under tmp_path (needs root; skipped, saying why, otherwise)."""
    mount_point = tmp_path / "nvme"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={FS_BYTES}", "tmpfs", str(mount_point)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs (needs root): {done.stderr.strip() or done.returncode}"
        print(reason)
        pytest.skip(reason)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def request(text: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt=text, max_tokens=12, ignore_eos=True, sampling=pb.SamplingParams(temperature=0.0)
    )


async def tier_stats(stack: Stack) -> tier_pb2.StatsResponse:
    async with stack.internal_channel(stack.tier) as channel:
        return await tier_pb2_grpc.TierStub(channel).Stats(tier_pb2.StatsRequest(), timeout=10)


@pytest.mark.slow
async def test_full_nvme_disk_fails_no_request_and_is_counted(
    tmp_path: Path, small_fs: Path, tiny_llama_dir: Path, redis_url: str
) -> None:
    (tmp_path / "stack").mkdir()
    stack = await asyncio.to_thread(
        start_stack, tmp_path / "stack", str(tiny_llama_dir), redis_url, 1, settings(small_fs)
    )
    try:
        async with grpc.aio.insecure_channel(stack.gateway) as channel:
            client = inference_pb2_grpc.InferenceStub(channel)
            first: dict[int, list[int]] = {}
            for i in range(PROMPTS):
                reply = await client.Generate(request(prompt(i)), timeout=60)
                assert reply.usage.completion_tokens == 12 and reply.usage.prompt_tokens > 8 * BLOCK
                first[i] = list(reply.token_ids)
            await until(lambda: _write_errors(stack), "the tier to count refused NVMe writes", 30)
            cached = 0
            for i in range(REPEATED):
                reply = await client.Generate(request(prompt(i)), timeout=60)
                assert list(reply.token_ids) == first[i], f"prompt {i} changed after the disk filled"
                cached += reply.usage.cached_tokens
        stats = await tier_stats(stack)
        nvme = stats.tiers[1]
        on_disk = sum(p.stat().st_size for p in small_fs.rglob("*.blk"))
        print(
            f"ENOSPC: {stats.nvme_write_errors} NVMe writes refused; NVMe holds {nvme.blocks} blocks, "
            f"{nvme.used_bytes} bytes ({on_disk} in files) on a {FS_BYTES}-byte tmpfs; "
            f"{stats.blocks_demoted} blocks demoted; repeated prompts reused {cached} cached tokens"
        )
        assert stats.nvme_write_errors > 0
        assert nvme.used_bytes == on_disk <= FS_BYTES
        assert nvme.blocks == len(list(small_fs.rglob("*.blk"))) > 0
        # The first refusals taught the tier the disk's real size: it evicts to make room since,
        # so refusals stay a handful (the writes in flight when the disk filled) and demotions go on.
        assert nvme.capacity_bytes <= FS_BYTES
        assert stats.nvme_write_errors <= IO_DEPTH
        assert stats.blocks_demoted > nvme.blocks + stats.nvme_write_errors
        assert not list(small_fs.rglob("*.tmp-*")), "a refused write left its temp file"
        assert "exited with" not in stack.log() and "Traceback" not in stack.log()
    finally:
        assert await asyncio.to_thread(stack.stop) == 0, stack.log()[-3000:]


async def _write_errors(stack: Stack) -> bool:
    return (await tier_stats(stack)).nvme_write_errors > 0
