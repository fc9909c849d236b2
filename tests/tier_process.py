"""A tier service process for tests: start, stop, and blocks whose content follows from their hash."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import torch
import yaml

from wicore.kv.block import Codec, EncodedBlock
from wicore.kv.codecs import decode, encode
from wicore.kv.hashing import BlockHash
from wicore.kv.wire import TIER_TO_PROTO, ChunkAssembler
from wicore.kv.wire import block_chunks as wire_chunks
from wicore.server import wait_for_serving
from wicore.v1 import tier_pb2, tier_pb2_grpc

from stack import free_port

MiB = 1 << 20
BLOCK_SHAPE = (8, 2, 16, 4, 64)  # float32: 256 KiB raw
BLOCK_BYTES = 8 * 2 * 16 * 4 * 64 * 4
CAPACITY = 8 * MiB  # 32 raw blocks
NVME_CAPACITY = 64 * MiB
CHUNK = 100_000  # so a raw block spans three chunks
START_CODE = (
    "import asyncio,sys; from wicore.config import load_config; from wicore.tier.app import serve; "
    "asyncio.run(serve(load_config(sys.argv[1])))"
)


def new_hash() -> BlockHash:
    return BlockHash(uuid.uuid4().hex)


def kv_of(block_hash: str, layers: int = BLOCK_SHAPE[0]) -> torch.Tensor:
    """The block's tensor, derived from its hash (so any test can say what a block must hold)."""
    generator = torch.Generator().manual_seed(int(block_hash[:12], 16))
    return torch.randn((layers, *BLOCK_SHAPE[1:]), generator=generator)


def raw_of(block_hash: str, layers: int = BLOCK_SHAPE[0]) -> EncodedBlock:
    return encode(kv_of(block_hash, layers), Codec.RAW)


@dataclass
class TierProcess:
    proc: subprocess.Popen[bytes]
    address: str
    namespace: str
    nvme_dir: Path


def start_tier(
    tmp: Path,
    redis_url: str,
    namespace: str,
    redis: dict[str, object] | None = None,
    a2cr: dict[str, object] | None = None,
    **tier: object,
) -> TierProcess:
    """A tier process on a free port; `tier` overrides its settings, `redis` the Redis ones,
    `a2cr` the a2cr_config ones."""
    port = free_port()
    nvme_dir = tmp / "nvme"
    settings = {
        "host": "127.0.0.1",
        "port": port,
        "cpu_capacity_bytes": CAPACITY,
        "cpu_codec": "raw",
        "nvme_capacity_bytes": NVME_CAPACITY,
        "nvme_codec": "q4",
        "nvme_dir": str(nvme_dir),
        "chunk_bytes": CHUNK,
        "max_block_bytes": 16 * MiB,
    }
    settings.update(tier)
    config = {
        "tier": settings,
        "redis": {"url": redis_url, "namespace": namespace, **(redis or {})},
        "a2cr_config": {"cleanup_interval": 0.2, **(a2cr or {})},
        "shutdown_grace_s": 2.0,
        "observability": {"metrics_port": 0},  # several tiers may run at once
    }
    cfg_path = tmp / f"tier-{port}.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([sys.executable, "-c", START_CODE, str(cfg_path)])
    return TierProcess(proc, f"127.0.0.1:{port}", namespace, nvme_dir)


async def wait_up(tier: TierProcess) -> None:
    if not await wait_for_serving(tier.address, timeout_s=30):
        tier.proc.kill()
        pytest.fail(f"tier service did not become SERVING (exit code {tier.proc.poll()})")


def stop(tier: TierProcess) -> None:
    if tier.proc.poll() is None:
        tier.proc.kill()
        tier.proc.wait(timeout=10)


@contextlib.asynccontextmanager
async def running_tier(tmp: Path, redis_url: str, **tier: object) -> AsyncIterator[TierProcess]:
    """A tier process in a fresh Redis namespace, serving; killed and its keys deleted after."""
    running = start_tier(tmp, redis_url, f"wicore-test-{uuid.uuid4().hex}", **tier)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        await wait_up(running)
        yield running
    finally:
        stop(running)
        delete_namespace(client, running.namespace)
        client.close()


def delete_namespace(client: redis.Redis, namespace: str) -> None:
    keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
    if keys:
        client.delete(*keys)


def block_chunks(
    block_hash: str, block: EncodedBlock, chunk: int = CHUNK, checksum: str | None = None
) -> list[tier_pb2.BlockChunk]:
    """The block's PutBlocks chunks; `checksum` replaces the header's (to send a wrong one)."""
    chunks = list(wire_chunks(BlockHash(block_hash), block, chunk))
    if checksum is not None:
        chunks[0].header.checksum = checksum
    return chunks


async def put(stub: tier_pb2_grpc.TierStub, *hashes: str) -> tier_pb2.PutBlocksResponse:
    chunks = [c for block_hash in hashes for c in block_chunks(block_hash, raw_of(block_hash))]
    return await stub.PutBlocks(iter(chunks), timeout=30)


async def get(stub: tier_pb2_grpc.TierStub, hashes: list[str]) -> dict[str, tuple[EncodedBlock, int]]:
    """The streamed blocks, reassembled and checked (chunk protocol, checksums):
    hash -> (block, the proto tier it came from)."""
    assembler = ChunkAssembler(1 << 30)
    found: dict[str, tuple[EncodedBlock, int]] = {}
    async for chunk in stub.GetBlocks(tier_pb2.GetBlocksRequest(block_hashes=hashes), timeout=30):
        received = assembler.feed(chunk)
        if received is not None:
            assert received.source_tier is not None, "GetBlocks must say where each block came from"
            found[received.block_hash] = (received.block, TIER_TO_PROTO[received.source_tier])
    assembler.finish()
    return found


def assert_q4_close(block: EncodedBlock, want: torch.Tensor) -> None:
    """q4 bound, loosely: a 16th of each (layer, k/v, head) range; exactness is the codec tests' job."""
    assert block.header.codec is Codec.Q4
    got = decode(block)
    span = want.amax(dim=(2, 4), keepdim=True) - want.amin(dim=(2, 4), keepdim=True)
    assert bool(((got - want).abs() <= span / 16).all())
