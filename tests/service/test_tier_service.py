"""The tier service as a real process, over real gRPC on loopback, with a real Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import redis
import redis.asyncio as aioredis
import yaml

from wicore.hashing import BlockHash, payload_checksum
from wicore.server import CHANNEL_OPTIONS, wait_for_serving
from wicore.tier.metadata import BlockMetadata, connect_redis
from wicore.tier.store import Codec, CpuTier
from wicore.v1 import tier_pb2, tier_pb2_grpc

MiB = 1 << 20
CAPACITY = 8 * MiB
CHUNK = 1 * MiB
START_CODE = (
    "import asyncio,sys; from wicore.config import load_config; from wicore.tier.app import serve; "
    "asyncio.run(serve(load_config(sys.argv[1])))"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_hash() -> BlockHash:
    return BlockHash(uuid.uuid4().hex)


@dataclass
class TierProcess:
    proc: subprocess.Popen[bytes]
    address: str
    namespace: str


def start_tier(tmp: Path, redis_url: str, namespace: str) -> TierProcess:
    port = free_port()
    config = {
        "tier": {"host": "127.0.0.1", "port": port, "cpu_capacity_bytes": CAPACITY, "chunk_bytes": CHUNK},
        "redis": {"url": redis_url, "namespace": namespace},
        "shutdown_grace_s": 2.0,
    }
    cfg_path = tmp / f"tier-{port}.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([sys.executable, "-c", START_CODE, str(cfg_path)])
    return TierProcess(proc, f"127.0.0.1:{port}", namespace)


async def wait_up(tier: TierProcess) -> None:
    if not await wait_for_serving(tier.address, timeout_s=30):
        tier.proc.kill()
        pytest.fail(f"tier service did not become SERVING (exit code {tier.proc.poll()})")


def stop(tier: TierProcess) -> None:
    if tier.proc.poll() is None:
        tier.proc.kill()
        tier.proc.wait(timeout=10)


def delete_namespace(client: redis.Redis, namespace: str) -> None:
    keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture(scope="module")
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture(scope="module")
async def tier(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, redis_client: redis.Redis
) -> AsyncIterator[TierProcess]:
    running = start_tier(tmp_path_factory.mktemp("tier"), redis_url, f"wicore-test-{uuid.uuid4().hex}")
    try:
        await wait_up(running)
        yield running
    finally:
        stop(running)
        delete_namespace(redis_client, running.namespace)


@pytest.fixture(scope="module")
async def stub(tier: TierProcess) -> AsyncIterator[tier_pb2_grpc.TierStub]:
    async with grpc.aio.insecure_channel(tier.address, options=CHANNEL_OPTIONS) as channel:
        yield tier_pb2_grpc.TierStub(channel)


def block_chunks(
    block_hash: str, payload: bytes, chunk: int = CHUNK, checksum: str | None = None
) -> list[tier_pb2.BlockChunk]:
    header = tier_pb2.BlockHeader(
        block_hash=block_hash,
        codec=tier_pb2.CODEC_RAW,
        dtype="float16",
        shape=[2, len(payload) // 2],
        payload_bytes=len(payload),
        checksum=checksum if checksum is not None else payload_checksum(payload),
    )
    chunks = []
    for offset in range(0, len(payload), chunk):
        msg = tier_pb2.BlockChunk(block_hash=block_hash, offset=offset, data=payload[offset : offset + chunk])
        if offset == 0:
            msg.header.CopyFrom(header)
        chunks.append(msg)
    return chunks


async def put(stub: tier_pb2_grpc.TierStub, *blocks: tuple[str, bytes]) -> tier_pb2.PutBlocksResponse:
    chunks = [c for block_hash, payload in blocks for c in block_chunks(block_hash, payload)]
    return await stub.PutBlocks(iter(chunks), timeout=30)


async def get(stub: tier_pb2_grpc.TierStub, hashes: list[str]) -> dict[str, bytes]:
    """Reassembles the streamed blocks, checking the chunk protocol on the way."""
    out: dict[str, bytearray] = {}
    headers: dict[str, tier_pb2.BlockHeader] = {}
    async for chunk in stub.GetBlocks(tier_pb2.GetBlocksRequest(block_hashes=hashes), timeout=30):
        if chunk.HasField("header"):
            assert chunk.offset == 0 and chunk.block_hash not in out
            headers[chunk.block_hash] = chunk.header
            out[chunk.block_hash] = bytearray()
        else:
            assert 0 < len(chunk.data) <= CHUNK
        assert chunk.offset == len(out[chunk.block_hash])
        out[chunk.block_hash] += chunk.data
    for block_hash, data in out.items():
        assert len(data) == headers[block_hash].payload_bytes
        assert payload_checksum(data) == headers[block_hash].checksum
    return {h: bytes(d) for h, d in out.items()}


async def test_put_get_round_trip_is_byte_identical(
    stub: tier_pb2_grpc.TierStub, tier: TierProcess, redis_client: redis.Redis
) -> None:
    big, small = new_hash(), new_hash()
    big_payload = os.urandom(7 * MiB // 2)  # 3.5 MiB: four chunks
    small_payload = os.urandom(1000)
    reply = await put(stub, (big, big_payload), (small, small_payload))
    assert reply.stored == 2
    got = await get(stub, [big, new_hash(), small])  # the absent one is skipped
    assert got == {big: big_payload, small: small_payload}

    fields = redis_client.hgetall(f"{tier.namespace}:blk:{big}")
    assert fields["tier"] == "cpu" and fields["codec"] == "raw" and fields["dtype"] == "float16"
    assert int(fields["bytes"]) == len(big_payload) and int(fields["hits"]) == 1
    assert float(fields["last_access"]) >= float(fields["created"]) > 0
    score = redis_client.zscore(f"{tier.namespace}:a2cr:cpu", big)
    assert score == pytest.approx(float(fields["last_access"]))


async def test_capacity_evicts_oldest_and_its_metadata(
    stub: tier_pb2_grpc.TierStub, tier: TierProcess, redis_client: redis.Redis
) -> None:
    hashes = [new_hash() for _ in range(4)]
    reply = await put(stub, *((h, os.urandom(3 * MiB)) for h in hashes))  # 12 MiB into 8 MiB
    assert reply.stored == 4
    evicted = list(reply.evicted_hashes)
    assert reply.evicted == len(evicted)
    assert [h for h in evicted if h in hashes] == hashes[:2]

    lookup = await stub.Lookup(tier_pb2.LookupRequest(block_hashes=hashes[2:]), timeout=10)
    assert lookup.prefix_blocks == 2
    assert await get(stub, hashes[:2]) == {}
    for gone in hashes[:2]:
        assert redis_client.exists(f"{tier.namespace}:blk:{gone}") == 0
        assert redis_client.zscore(f"{tier.namespace}:a2cr:cpu", gone) is None
    for kept in hashes[2:]:
        assert redis_client.exists(f"{tier.namespace}:blk:{kept}") == 1

    stats = await stub.Stats(tier_pb2.StatsRequest(), timeout=10)
    (cpu,) = stats.tiers
    assert stats.redis_ok
    assert cpu.tier == tier_pb2.STORAGE_TIER_CPU and cpu.capacity_bytes == CAPACITY
    assert 6 * MiB <= cpu.used_bytes <= CAPACITY
    assert cpu.evictions >= 2 and cpu.misses >= 2


async def test_block_larger_than_capacity_is_resource_exhausted(stub: tier_pb2_grpc.TierStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await put(stub, (new_hash(), os.urandom(CAPACITY + 1)))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_lookup_gives_longest_present_prefix(stub: tier_pb2_grpc.TierStub) -> None:
    a, b, c, missing = (new_hash() for _ in range(4))
    await put(stub, (a, b"a" * 100), (b, b"b" * 100), (c, b"c" * 100))
    reply = await stub.Lookup(tier_pb2.LookupRequest(block_hashes=[a, b, missing, c]), timeout=10)
    assert reply.prefix_blocks == 2
    assert list(reply.tiers) == [tier_pb2.STORAGE_TIER_CPU] * 2
    reply = await stub.Lookup(tier_pb2.LookupRequest(block_hashes=[missing, a]), timeout=10)
    assert reply.prefix_blocks == 0 and list(reply.tiers) == []


async def test_checksum_mismatch_is_invalid_argument(stub: tier_pb2_grpc.TierStub) -> None:
    block_hash = new_hash()
    payload = os.urandom(3 * CHUNK // 2)
    chunks = block_chunks(block_hash, payload, checksum=payload_checksum(payload + b"x"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.PutBlocks(iter(chunks), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "header.checksum" in (info.value.details() or "")
    assert await get(stub, [block_hash]) == {}


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda c: setattr(c[0], "block_hash", "../../etc/passwd"), "block_hash"),
        (lambda c: setattr(c[0].header, "block_hash", "ABC"), "header.block_hash"),
        (lambda c: c[0].ClearField("header"), "header"),
        (lambda c: setattr(c[1], "offset", 7), "offset"),
        (lambda c: c.pop(), "data"),
        (lambda c: setattr(c[0].header, "payload_bytes", 1 << 40), "header.payload_bytes"),
        (lambda c: setattr(c[0].header, "codec", tier_pb2.CODEC_UNSPECIFIED), "header.codec"),
    ],
)
async def test_malformed_put_names_the_field(
    stub: tier_pb2_grpc.TierStub, mutate: Callable[[list[tier_pb2.BlockChunk]], object], field: str
) -> None:
    chunks = block_chunks(new_hash(), os.urandom(2 * CHUNK + 10))
    mutate(chunks)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.PutBlocks(iter(chunks), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith(f"{field}:")


async def test_malformed_hash_in_get_and_lookup(stub: tier_pb2_grpc.TierStub) -> None:
    bad = [new_hash(), "not-a-hash"]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await get(stub, bad)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith("block_hashes[1]:")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Lookup(tier_pb2.LookupRequest(block_hashes=bad), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith("block_hashes[1]:")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Lookup(tier_pb2.LookupRequest(block_hashes=[new_hash()] * 4097), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_sigterm_exits_zero_and_forgets_its_blocks(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    running = start_tier(tmp_path, redis_url, f"wicore-test-{uuid.uuid4().hex}")
    try:
        await wait_up(running)
        block_hash = new_hash()
        async with grpc.aio.insecure_channel(running.address, options=CHANNEL_OPTIONS) as channel:
            assert (await put(tier_pb2_grpc.TierStub(channel), (block_hash, b"x" * 4096))).stored == 1
        assert redis_client.exists(f"{running.namespace}:blk:{block_hash}") == 1
        started = time.monotonic()
        running.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(running.proc.wait, 10) == 0
        assert time.monotonic() - started < 5
        assert list(redis_client.scan_iter(match=f"{running.namespace}:*")) == []
    finally:
        stop(running)
        delete_namespace(redis_client, running.namespace)


async def test_serves_without_redis(tmp_path: Path) -> None:
    dead_url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    running = start_tier(tmp_path, dead_url, "wicore-test-unused")
    try:
        await wait_up(running)
        async with grpc.aio.insecure_channel(running.address, options=CHANNEL_OPTIONS) as channel:
            stub = tier_pb2_grpc.TierStub(channel)
            block_hash, payload = new_hash(), os.urandom(CHUNK + 1)
            assert (await put(stub, (block_hash, payload))).stored == 1
            assert await get(stub, [block_hash]) == {block_hash: payload}
            stats = await stub.Stats(tier_pb2.StatsRequest(), timeout=10)
            assert not stats.redis_ok
            assert stats.tiers[0].blocks == 1
        running.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(running.proc.wait, 10) == 0
    finally:
        stop(running)


class FlakyRedis:
    """A real asyncio Redis client that can be made to look unreachable."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise redis.ConnectionError("Error 111 connecting (simulated)")

    def pipeline(self, transaction: bool = True) -> Any:
        self._check()
        return self.client.pipeline(transaction=transaction)

    def ping(self) -> Any:
        self._check()
        return self.client.ping()


async def test_metadata_degrades_and_recovers(redis_url: str, redis_client: redis.Redis) -> None:
    namespace = f"wicore-test-{uuid.uuid4().hex}"
    clock = [0.0]
    flaky = FlakyRedis(connect_redis(redis_url))
    metadata = BlockMetadata(cast(aioredis.Redis, flaky), namespace, clock=lambda: clock[0])
    store = CpuTier(100)
    a, b = new_hash(), new_hash()
    try:
        store.put(a, Codec.RAW, "float16", (4,), b"a" * 8, payload_checksum(b"a" * 8))
        await metadata.sync(store, [a], [])
        assert metadata.redis_ok and redis_client.exists(f"{namespace}:blk:{a}") == 1

        flaky.down = True
        store.put(b, Codec.RAW, "float16", (4,), b"b" * 8, payload_checksum(b"b" * 8))
        await metadata.sync(store, [b], [])  # fails, marks degraded, does not raise
        assert not metadata.redis_ok
        flaky.down = False
        await metadata.sync(store, [b], [])  # within retry_after_s: skipped
        assert not metadata.redis_ok and redis_client.exists(f"{namespace}:blk:{b}") == 0

        clock[0] = 1.5
        await metadata.sync(store, [b], [])
        assert metadata.redis_ok and redis_client.exists(f"{namespace}:blk:{b}") == 1
        flaky.down = True
        assert not await metadata.ping()
        flaky.down = False
        assert await metadata.ping()
    finally:
        await flaky.client.aclose()
        delete_namespace(redis_client, namespace)
