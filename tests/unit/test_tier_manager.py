"""TierManager in process: real CPU tier, real NVMe files under tmp_path, real Redis; clock injected.

Blocks are real KV tensors [layers, 2, tokens, heads, dim]. Exact orders use the
"raw" CPU codec so every block has the same size (8192 bytes) and capacities are
counted in blocks.
"""

from __future__ import annotations

import dataclasses
import errno
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import torch

from wicore.config import A2crConfig, TierConfig, TierPolicy
from wicore.errors import Overloaded
from wicore.kv.attention import Observation
from wicore.kv.block import Codec, EncodedBlock, StorageTier
from wicore.kv.codecs import decode, encode
from wicore.kv.hashing import BlockHash
from wicore.redis_server import fast_failing_client
from wicore.tier.manager import TierManager
from wicore.tier.metadata import BlockMetadata
from wicore.tier.nvme import HEADER_SIZE, NvmeTier
from wicore.tier.store import CpuTier

from clocks import ManualClock

SHAPE = (1, 2, 16, 2, 32)  # float32: 8192 bytes raw
RAW_BYTES = 8192
CPU, NVME = StorageTier.CPU, StorageTier.NVME


def h(i: int) -> BlockHash:
    return BlockHash(f"{i:032x}")


def kv(i: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))


def raw(i: int) -> EncodedBlock:
    return encode(kv(i), Codec.RAW, sink_tokens=4 if i == 0 else 0)


def config(**changes: object) -> TierConfig:
    base = TierConfig(
        cpu_capacity_bytes=4 * RAW_BYTES,
        cpu_codec=Codec.RAW,
        nvme_capacity_bytes=8 * (RAW_BYTES + HEADER_SIZE),
        nvme_codec=Codec.RAW,
        high_watermark=1.0,
        low_watermark=1.0,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(100.0)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
async def metadata(redis_url: str, redis_client: redis.Redis) -> AsyncIterator[BlockMetadata]:
    namespace = f"wicore-test-{uuid.uuid4().hex}"
    client = fast_failing_client(redis_url, 0.5)
    yield BlockMetadata(client, namespace)
    await client.aclose()
    keys = list(redis_client.scan_iter(match=f"{namespace}:*"))
    if keys:
        redis_client.delete(*keys)


# The performance guide's weights: the measured attention share takes part in the score.
GUIDE_WEIGHTS = A2crConfig(attention_weight=0.4, frequency_weight=0.3, recency_weight=0.3)


def make(
    tmp_path: Path,
    clock: ManualClock,
    metadata: BlockMetadata | None = None,
    a2cr: A2crConfig | None = None,
    **changes: object,
) -> TierManager:
    tc = config(**changes)
    return TierManager(
        tc, a2cr or A2crConfig(), metadata, tmp_path / "nvme" if tc.nvme_capacity_bytes else None, clock
    )


async def put(manager: TierManager, clock: ManualClock, *indexes: int) -> list[BlockHash]:
    evicted: list[BlockHash] = []
    for i in indexes:
        clock.now += 1.0
        evicted += (await manager.put([(h(i), raw(i))])).evicted
        manager.check_integrity()
    return evicted


def cpu_tier(manager: TierManager) -> CpuTier:
    (tier,) = (t for t in manager.tiers if isinstance(t, CpuTier))
    return tier


def nvme_tier(manager: TierManager) -> NvmeTier:
    (tier,) = (t for t in manager.tiers if isinstance(t, NvmeTier))
    return tier


def tiers(manager: TierManager, *indexes: int) -> list[StorageTier | None]:
    return [manager.tier_of(h(i)) for i in indexes]


async def test_cpu_tier_accounting() -> None:
    cpu = CpuTier(3 * RAW_BYTES, Codec.RAW)
    for i in range(3):
        await cpu.put(h(i), raw(i), 0.0)
    await cpu.put(h(0), raw(0), 0.0)  # present: kept, not counted twice
    assert cpu.used_bytes == 3 * RAW_BYTES and cpu.bytes_in == 3 * RAW_BYTES
    with pytest.raises(Overloaded, match="do not fit the CPU tier"):
        await cpu.put(h(3), raw(3), 0.0)
    assert await cpu.get_many([h(1), h(9)], count=True) == [raw(1), None]
    assert await cpu.remove([h(1), h(1)], evicted=True) == [h(1)]
    await cpu.put(h(3), raw(3), 0.0)
    cpu.check_integrity()
    stats = cpu.stats()
    assert sorted(cpu.sizes()) == [h(0), h(2), h(3)] and cpu.codec_of(h(0)) is Codec.RAW
    assert (stats.hits, stats.misses, stats.evictions, stats.bytes_out) == (1, 1, 1, RAW_BYTES)


async def test_raw_round_trip_is_exact_and_q8_is_bounded(tmp_path: Path, clock: ManualClock) -> None:
    manager = make(tmp_path, clock, cpu_codec=Codec.Q8)
    await put(manager, clock, 0, 1)
    got = {block_hash: (block, tier) for block_hash, block, tier in await manager.get([h(1), h(9), h(0)])}
    assert set(got) == {h(0), h(1)}
    block, tier = got[h(1)]
    assert tier is CPU and block.header.codec is Codec.Q8 and block.verify() and block.nbytes < RAW_BYTES / 3
    want = kv(1)
    groups = want.reshape(*SHAPE[:-1], 1, 32).abs().amax(-1, keepdim=True)
    error = (decode(block) - want).reshape(*SHAPE[:-1], 1, 32).abs()
    assert bool((error <= groups / 254 * (1 + 2**-9) + 1e-6).all())
    assert got[h(0)][0].header.sink_tokens == 4  # the raw block's hint became q8's fp16 sinks
    assert torch.equal(decode(got[h(0)][0])[:, :, :4], kv(0)[:, :, :4].half().float())

    lossless = make(tmp_path / "raw", clock)
    await put(lossless, clock, 1)
    ((_, block, _),) = await lossless.get([h(1)])
    assert block == raw(1) and torch.equal(decode(block), kv(1))


async def test_overflow_demotes_lowest_scores_to_nvme_and_a_hit_promotes(
    tmp_path: Path, clock: ManualClock
) -> None:
    manager = make(tmp_path, clock, a2cr=A2crConfig(promotion_admission=False))
    await put(manager, clock, 0, 1, 2, 3)
    for _ in range(3):  # 2 and 3 are read often: frequency and recency keep them
        await manager.get([h(2), h(3)])
    assert await put(manager, clock, 4) == []  # 0 was the lowest score: demoted, not lost
    assert tiers(manager, 0, 1, 2, 3, 4) == [NVME, CPU, CPU, CPU, CPU]
    await put(manager, clock, 5)
    assert tiers(manager, 0, 1, 2, 3, 4, 5) == [NVME, NVME, CPU, CPU, CPU, CPU]
    assert manager.lookup([h(0), h(1), h(2), h(7), h(3)]) == [NVME, NVME, CPU]

    clock.now += 1.0
    ((_, block, tier),) = await manager.get([h(0)])
    assert tier is NVME and block == raw(0)
    manager.check_integrity()
    # Promoted (its NVMe file kept); the lowest CPU score (4, read once and older than 5) made room.
    assert tiers(manager, 0, 4) == [CPU, NVME]
    stats = manager.stats()
    assert (stats.blocks_demoted, stats.blocks_promoted) == (3, 1)
    assert stats.bytes_promoted == RAW_BYTES and stats.bytes_demoted == 3 * (RAW_BYTES + HEADER_SIZE)
    assert [t.blocks for t in stats.tiers] == [4, 3]
    assert set(cpu_tier(manager).sizes()) == {h(0), h(2), h(3), h(5)} and set(nvme_tier(manager).sizes()) == {
        h(0),
        h(1),
        h(4),
    }


@pytest.mark.parametrize("admission", [True, False])
async def test_a_full_cpu_tier_admits_only_blocks_read_more_than_its_median_resident(
    tmp_path: Path, clock: ManualClock, admission: bool
) -> None:
    """TinyLFU's admission: an NVMe hit read no more often than the CPU tier's median resident
    (the lower median of their reads) is served from NVMe and stays there; one read more is promoted."""
    manager = make(tmp_path, clock, a2cr=A2crConfig(promotion_admission=admission))
    await put(manager, clock, 0, 1, 2, 3)
    await manager.get([h(0)])  # 0: read twice
    await put(manager, clock, 4, 5)  # CPU full: 1 and 2 (read once, oldest) go to NVMe
    assert tiers(manager, 0, 1, 2, 3, 4, 5) == [CPU, NVME, NVME, CPU, CPU, CPU]
    # CPU reads: 0 twice, 3, 4 and 5 once: the lower median is 1.
    ((_, block, tier),) = await manager.get([h(1)])  # read once before: not more than 1
    assert (block, tier) == (raw(1), NVME)
    assert tiers(manager, 1) == [NVME if admission else CPU]
    assert manager._blocks[h(1)].hits == 2  # an access either way
    if admission:
        await manager.get([h(2)])  # once before: stays on NVMe
        assert tiers(manager, 2) == [NVME]
        await manager.get([h(2)])  # twice before, more than the median: promoted
        assert tiers(manager, 2) == [CPU] and manager.stats().blocks_promoted == 1
    manager.check_integrity()


async def test_attention_decides_among_equals_with_the_guide_weights(
    tmp_path: Path, clock: ManualClock
) -> None:
    manager = make(tmp_path, clock, a2cr=GUIDE_WEIGHTS, nvme_capacity_bytes=0)
    clock.now += 1.0
    await manager.put([(h(i), raw(i)) for i in range(4)])  # same time, same hits
    # 2 gets almost all attention, 0 and 3 little, 1 none at all.
    await manager.update_scores(
        [Observation(h(2), 0.9, 4), Observation(h(0), 0.05, 4), Observation(h(3), 0.05, 4)]
    )
    await manager.update_scores(
        [Observation(h(1), 0.0, 4), Observation(h(99), 0.5, 4)]
    )  # 99: unknown, ignored
    lost = await put(manager, clock, 4)
    assert lost == [h(1)]  # no NVMe tier: the victim leaves every tier
    lost = await put(manager, clock, 5)
    assert lost == [h(0)]  # 0 and 3 tie on everything but the hash
    assert tiers(manager, 2, 3, 4, 5) == [CPU] * 4


async def test_watermarks_free_down_to_low(tmp_path: Path, clock: ManualClock) -> None:
    manager = make(
        tmp_path,
        clock,
        cpu_capacity_bytes=10 * RAW_BYTES,
        nvme_capacity_bytes=20 * (RAW_BYTES + HEADER_SIZE),
        high_watermark=0.9,
        low_watermark=0.5,
    )
    await put(manager, clock, *range(10))
    # The 10th block does not overflow; the cleanup pass sees 100 % >= 90 % and frees down to 50 %.
    await manager.cleanup()
    manager.check_integrity()
    assert tiers(manager, *range(10)) == [NVME] * 5 + [CPU] * 5  # oldest first under equal hits
    await put(manager, clock, *range(10, 16))  # the 6th overflows: it frees down to 50 % first
    assert cpu_tier(manager).used_bytes == 5 * RAW_BYTES


async def test_cleanup_demotes_below_threshold_and_tunes_to_pressure(
    tmp_path: Path, clock: ManualClock
) -> None:
    manager = make(tmp_path, clock, cpu_capacity_bytes=8 * RAW_BYTES)
    await put(manager, clock, 0, 1)  # at 101 and 102
    await manager.get([h(1)])  # 1: two hits
    clock.now += 300.0  # idle for about the frequency horizon
    await put(manager, clock, 2)
    await manager.cleanup()  # pressure 3/8 < 0.7: threshold 0.2, decay 0.02
    params = manager.stats().params[CPU]
    assert params is not None and (params.eviction_threshold, params.time_decay_factor) == (0.2, 0.02)
    # F = c / (1 + c), c = hits · exp(-idle / 300): 0 -> c 0.365, F 0.267; 1 -> c 0.733, F 0.423
    assert tiers(manager, 0, 1, 2) == [CPU, CPU, CPU]
    await put(manager, clock, 3, 4, 5, 6, 7)  # 8/8 > 0.9 at the next cleanup: threshold 0.4
    await manager.cleanup()
    params = manager.stats().params[CPU]
    assert params is not None and params.eviction_threshold == 0.4
    # 0 (read once, idle 307 s): F 0.264 < 0.4, demoted; 1 (read twice, idle 306 s): F 0.419 stays
    assert tiers(manager, 0, 1) == [NVME, CPU]
    assert all(t is CPU for t in tiers(manager, 2, 3, 4, 5, 6, 7))


@pytest.mark.parametrize("policy", [TierPolicy.A2CR, TierPolicy.LRU, TierPolicy.LFU])
async def test_a_chain_read_together_loses_its_leaf_first(
    tmp_path: Path, clock: ManualClock, policy: TierPolicy
) -> None:
    """A GetBlocks reads a chain (first block first) at one moment: under pressure its deepest block
    leaves first, never its root (the hashes would have picked 0, the root)."""
    manager = make(tmp_path, clock, policy=policy, nvme_capacity_bytes=0)
    await put(manager, clock, 0, 1, 2, 3)
    clock.now += 1.0
    assert len(await manager.get([h(0), h(1), h(2), h(3)])) == 4
    assert {manager._blocks[h(i)].position for i in range(4)} == {0, 1, 2, 3}
    assert await put(manager, clock, 4) == [h(3)]
    assert manager.lookup([h(0), h(1), h(2), h(3)]) == [CPU, CPU, CPU]
    # next: LRU takes 2, the chain's new leaf; A²CR and LFU take 4, read once, before the chain read twice
    assert await put(manager, clock, 5) == [h(2) if policy is TierPolicy.LRU else h(4)]


async def test_nvme_full_evicts_its_lowest_and_reports_lost_blocks(
    tmp_path: Path, clock: ManualClock
) -> None:
    manager = make(tmp_path, clock, cpu_capacity_bytes=0, nvme_capacity_bytes=3 * (RAW_BYTES + HEADER_SIZE))
    await put(manager, clock, 0, 1, 2)
    assert tiers(manager, 0, 1, 2) == [NVME] * 3
    await manager.get([h(0)])
    assert await put(manager, clock, 3) == [h(1)]  # 1: older than 2, read less than 0
    assert tiers(manager, 0, 1, 2, 3) == [NVME, None, NVME, NVME]
    with pytest.raises(Overloaded, match="exceed the NVMe tier's capacity"):
        await manager.put([(h(9), encode(torch.zeros(5, 2, 16, 2, 32), Codec.RAW))])  # 40 KiB > 3 blocks
    assert tiers(manager, 0, 2, 3) == [NVME] * 3  # nothing was evicted for it
    manager.check_integrity()


async def test_block_larger_than_the_cpu_tier_is_refused(tmp_path: Path, clock: ManualClock) -> None:
    manager = make(tmp_path, clock, cpu_capacity_bytes=RAW_BYTES - 1)
    with pytest.raises(Overloaded, match="exceed the CPU tier's capacity"):
        await manager.put([(h(0), raw(0))])
    assert len(manager) == 0


async def test_corrupt_file_is_deleted_counted_and_never_served(tmp_path: Path, clock: ManualClock) -> None:
    manager = make(tmp_path, clock, cpu_capacity_bytes=0)
    await put(manager, clock, 0, 1)
    path = nvme_tier(manager).path_of(h(0))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    got = await manager.get([h(0), h(1)])
    assert [(block_hash, tier) for block_hash, _, tier in got] == [(h(1), NVME)]
    assert manager.stats().corrupt_blocks == 1 and not path.exists() and manager.tier_of(h(0)) is None
    manager.check_integrity()


async def test_prefetch_drop_and_lookup(tmp_path: Path, clock: ManualClock) -> None:
    manager = make(tmp_path, clock, cpu_capacity_bytes=2 * RAW_BYTES)
    await put(manager, clock, 0, 1, 2, 3)
    assert tiers(manager, 0, 1, 2, 3) == [NVME, NVME, CPU, CPU]
    result = await manager.prefetch([h(0), h(2), h(8)])
    assert (result.promoted, result.already_cpu, result.missing) == (1, 1, 1)
    assert manager.tier_of(h(0)) is CPU
    assert manager.stats().tiers[1].hits == 0  # a prefetch read serves nobody: not a hit
    assert await manager.drop([h(0), h(1), h(8)]) == 2
    assert tiers(manager, 0, 1) == [None, None]
    assert not nvme_tier(manager).path_of(h(0)).exists()
    manager.check_integrity()


async def test_redis_mirror_moves_and_resyncs(
    tmp_path: Path, clock: ManualClock, metadata: BlockMetadata, redis_client: redis.Redis
) -> None:
    manager = make(tmp_path, clock, metadata, cpu_capacity_bytes=2 * RAW_BYTES)
    ns = metadata.block_key(h(0)).split(":blk:")[0]
    await manager.recover()  # empty NVMe: writes the sentinel
    await put(manager, clock, 0, 1)
    await manager.flush()
    assert redis_client.hget(f"{ns}:blk:{h(0)}", "tier") == "cpu"
    assert set(redis_client.zrange(f"{ns}:a2cr:cpu", 0, -1)) == {h(0), h(1)}

    await put(manager, clock, 2)  # 0 demoted
    await manager.flush()
    fields = redis_client.hgetall(f"{ns}:blk:{h(0)}")
    assert fields["tier"] == "nvme" and fields["nvme_copy"] == "1" and fields["codec"] == "raw"
    assert int(fields["bytes"]) == RAW_BYTES + HEADER_SIZE
    assert redis_client.zscore(f"{ns}:a2cr:cpu", h(0)) is None
    assert redis_client.zscore(f"{ns}:a2cr:nvme", h(0)) is not None

    await manager.update_scores([Observation(h(2), 1.0, 8)])
    await manager.flush()
    assert float(redis_client.hget(f"{ns}:blk:{h(2)}", "attention") or 0) > 0.5

    for key in redis_client.scan_iter(match=f"{ns}:*"):  # Redis loses our data while we run
        redis_client.delete(key)
    redis_client.hset(f"{ns}:blk:{h(77)}", "tier", "cpu")  # and a stale key appears
    await manager.flush()  # finds the sentinel gone: rewrites everything
    assert metadata.resyncs == 2
    blocks = {k.split(":blk:")[1] for k in redis_client.scan_iter(match=f"{ns}:blk:*")}
    assert blocks == {h(0), h(1), h(2)}
    assert set(redis_client.zrange(f"{ns}:a2cr:nvme", 0, -1)) == {h(0)}

    await manager.drop([h(2)])
    await manager.flush()
    assert (
        redis_client.exists(f"{ns}:blk:{h(2)}") == 0 and redis_client.zscore(f"{ns}:a2cr:cpu", h(2)) is None
    )


async def test_restart_recovers_nvme_blocks_with_their_statistics(
    tmp_path: Path, clock: ManualClock, metadata: BlockMetadata, redis_client: redis.Redis
) -> None:
    first = make(tmp_path, clock, metadata, cpu_capacity_bytes=0)
    await first.recover()
    await put(first, clock, 0, 1)
    for _ in range(3):
        await first.get([h(1)])
    await first.flush()
    nvme_tier(first).close()  # a crash: nothing more is written

    (tmp_path / "nvme" / "00" / f"{h(5)}.blk.tmp-deadbeef").write_bytes(b"half a block")
    second = make(tmp_path, clock, metadata, cpu_capacity_bytes=0)
    assert await second.recover() == 2
    assert not list((tmp_path / "nvme").rglob("*.tmp-*"))
    ((_, block, tier),) = await second.get([h(1)])
    assert block == raw(1) and tier is NVME
    ns = metadata.block_key(h(0)).split(":blk:")[0]
    # Redis holds what the restart restored: 1 put + 3 gets, then the get above (each operation flushes).
    assert redis_client.hget(f"{ns}:blk:{h(1)}", "hits") == "5"
    second.check_integrity()

    for key in redis_client.scan_iter(match=f"{ns}:*"):  # Redis restarted without persistence
        redis_client.delete(key)
    third = make(tmp_path, clock, metadata, cpu_capacity_bytes=0)
    assert await third.recover() == 2
    fields = redis_client.hgetall(f"{ns}:blk:{h(0)}")
    assert fields["tier"] == "nvme" and int(fields["bytes"]) == RAW_BYTES + HEADER_SIZE


async def test_nvme_drops_redundant_copies_first(tmp_path: Path, clock: ManualClock) -> None:
    manager = make(
        tmp_path, clock, cpu_capacity_bytes=2 * RAW_BYTES, nvme_capacity_bytes=3 * (RAW_BYTES + HEADER_SIZE)
    )
    await put(manager, clock, 0, 1, 2, 3)  # 0 and 1 demoted
    clock.now += 1.0
    await manager.get([h(0)])  # promoted, keeping its file; 2 demoted to make room: NVMe full
    assert set(nvme_tier(manager).sizes()) == {h(0), h(1), h(2)}
    assert await put(manager, clock, 4) == []  # 3 demoted: 0's copy goes, not 1 (the oldest, only on NVMe)
    assert tiers(manager, 0, 1, 2, 3, 4) == [CPU, NVME, NVME, NVME, CPU]
    assert set(nvme_tier(manager).sizes()) == {h(1), h(2), h(3)}
    assert manager.stats().blocks_demoted == 4  # 0 1 2 3 written once each
    manager.check_integrity()


async def test_cleanup_rescores_redis_without_rewriting_blocks(
    tmp_path: Path, clock: ManualClock, metadata: BlockMetadata, redis_client: redis.Redis
) -> None:
    manager = make(tmp_path, clock, metadata, cpu_capacity_bytes=8 * RAW_BYTES)
    await manager.recover()
    await put(manager, clock, 0)
    await manager.flush()
    ns = metadata.block_key(h(0)).split(":blk:")[0]
    before = redis_client.zscore(f"{ns}:a2cr:cpu", h(0))
    redis_client.hset(f"{ns}:blk:{h(0)}", "hits", "marker")  # a cleanup pass must not rewrite this
    clock.now += 60.0  # recency decays
    await manager.cleanup()
    after = redis_client.zscore(f"{ns}:a2cr:cpu", h(0))
    assert before is not None and after is not None and after < before
    assert after == pytest.approx(manager.policies[CPU].score(manager._blocks[h(0)]))
    assert redis_client.hget(f"{ns}:blk:{h(0)}", "hits") == "marker"
    await manager.drop([h(0)])
    await manager.flush()
    await manager.cleanup()
    assert redis_client.zscore(f"{ns}:a2cr:cpu", h(0)) is None  # XX: a dropped block is not re-added


async def test_failed_nvme_writes_are_counted_and_lose_only_their_blocks(
    tmp_path: Path, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full NVMe filesystem (ENOSPC on write): the demoted block leaves every tier, is reported
    lost, `nvme_write_errors` counts it, no temp file stays, and writes resume once there is room."""
    manager = make(tmp_path, clock)
    real_write = nvme_tier(manager)._write

    def full(path: Path, header: bytes, payload: bytes) -> None:
        tmp = path.with_name(f"{path.name}.tmp-full")
        tmp.write_bytes(header)  # the temp file exists when the disk runs out
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
        finally:
            tmp.unlink()

    await put(manager, clock, 0, 1, 2, 3)
    monkeypatch.setattr(nvme_tier(manager), "_write", full)
    assert await put(manager, clock, 4) == [h(0)]  # 0 was demoted, its write failed: lost
    assert tiers(manager, 0, 1, 2, 3, 4) == [None, CPU, CPU, CPU, CPU]
    assert manager.stats().nvme_write_errors == 1 and manager.stats().blocks_demoted == 0
    nvme = nvme_tier(manager)
    assert nvme.free_bytes == nvme.capacity_bytes  # the failed write's reservation is back
    assert not list((tmp_path / "nvme").rglob("*.tmp-*"))
    monkeypatch.setattr(nvme_tier(manager), "_write", real_write)
    assert await put(manager, clock, 5) == []  # 1 demoted, written
    assert tiers(manager, 1) == [NVME] and manager.stats().nvme_write_errors == 1
    manager.check_integrity()


async def test_a_full_nvme_disk_becomes_the_nvme_capacity_so_demotions_go_on(
    tmp_path: Path, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC with blocks on NVMe: the bytes held become the tier's capacity, so the next
    demotion evicts NVMe blocks to make room and is written, instead of failing forever."""
    manager = make(tmp_path, clock)
    real_write = nvme_tier(manager)._write

    def full(path: Path, header: bytes, payload: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    await put(manager, clock, 0, 1, 2, 3, 4, 5)  # 0 and 1 demoted to NVMe
    assert tiers(manager, 0, 1) == [NVME, NVME]
    held = nvme_tier(manager).used_bytes
    monkeypatch.setattr(nvme_tier(manager), "_write", full)
    assert await put(manager, clock, 6) == [h(2)]  # 2 demoted, refused by the disk: lost
    assert nvme_tier(manager).capacity_bytes == held and manager.stats().nvme_write_errors == 1
    monkeypatch.setattr(nvme_tier(manager), "_write", real_write)  # the disk stays as full as it was
    await put(manager, clock, 7)  # 3 demoted: NVMe makes room within what it holds
    assert tiers(manager, 0, 1, 3) == [None, NVME, NVME]  # the lowest score (oldest) made room
    assert nvme_tier(manager).used_bytes <= held and manager.stats().nvme_write_errors == 1
    manager.check_integrity()


async def test_a_demoted_block_is_not_taken_for_a_redundant_copy_while_it_leaves(
    tmp_path: Path, clock: ManualClock
) -> None:
    """Making room on NVMe for a demotion drops copies of blocks the CPU tier also holds first,
    but not of the blocks leaving the CPU tier in that same demotion: their CPU copy is going,
    so dropping their NVMe copy would lose them. LRU makes the scores plain access times."""
    manager = make(tmp_path, clock, cpu_capacity_bytes=2 * RAW_BYTES,
                   nvme_capacity_bytes=3 * (RAW_BYTES + HEADER_SIZE), policy=TierPolicy.LRU)  # fmt: skip
    assert await put(manager, clock, 0, 1, 2, 3, 4) == []  # 0, 1, 2 demoted to NVMe (full)
    clock.now += 1.0
    assert [t for _, _, t in await manager.get([h(0)])] == [NVME]  # promoted: 3 demoted, 1 (oldest) lost
    assert tiers(manager, 0, 1, 2, 3, 4) == [CPU, None, NVME, NVME, CPU]
    # A block as big as the CPU tier demotes both 4 (to be written) and 0 (its NVMe copy kept).
    clock.now += 1.0
    big = encode(torch.zeros(2, 2, 16, 2, 32), Codec.RAW)
    evicted = (await manager.put([(h(9), big)])).evicted
    assert evicted == [h(2)]  # the least recently used NVMe block, not 0's copy
    assert tiers(manager, 0, 2, 3, 4, 9) == [NVME, None, NVME, NVME, CPU]
    manager.check_integrity()
