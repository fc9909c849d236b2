"""CpuTier: exact LRU eviction order, byte accounting, counters."""

from __future__ import annotations

import pytest

from wicore.errors import Overloaded
from wicore.hashing import BlockHash
from wicore.tier.store import Codec, CpuTier, StorageTier, StoredBlock

from clocks import TickingClock


def h(i: int) -> BlockHash:
    return BlockHash(f"{i:032x}")


def put(tier: CpuTier, i: int, size: int) -> list[BlockHash]:
    return tier.put(h(i), Codec.RAW, "float16", (2, size // 2), bytes([i % 256]) * size, f"{i:032x}")


def order(tier: CpuTier) -> list[BlockHash]:
    return tier.hashes()


def peek(tier: CpuTier, i: int) -> StoredBlock:
    block = tier.peek(h(i))
    assert block is not None
    return block


@pytest.fixture
def tier() -> CpuTier:
    return CpuTier(100, clock=TickingClock())


def test_put_and_get(tier: CpuTier) -> None:
    assert put(tier, 1, 30) == []
    block = tier.get(h(1))
    assert block is not None
    assert block.payload == b"\x01" * 30
    assert (block.codec, block.dtype, block.shape) == (Codec.RAW, "float16", (2, 15))
    assert block.checksum == f"{1:032x}"
    assert (block.created, block.last_access, block.hits) == (1001.0, 1002.0, 1)
    assert tier.get(h(2)) is None
    stats = tier.stats()
    assert stats.tier is StorageTier.CPU
    assert (stats.used_bytes, stats.blocks, stats.hits, stats.misses) == (30, 1, 1, 1)
    assert (stats.bytes_in, stats.bytes_out, stats.evictions) == (30, 30, 0)
    tier.check_integrity()


def test_eviction_order_is_lru(tier: CpuTier) -> None:
    for i in range(1, 5):
        assert put(tier, i, 25) == []
    assert order(tier) == [h(1), h(2), h(3), h(4)]
    assert tier.used_bytes == 100
    tier.get(h(1))  # 1 becomes the most recent
    assert order(tier) == [h(2), h(3), h(4), h(1)]
    assert put(tier, 5, 25) == [h(2)]
    assert order(tier) == [h(3), h(4), h(1), h(5)]
    # A big block evicts as many as it needs, oldest first.
    assert put(tier, 6, 60) == [h(3), h(4), h(1)]
    assert order(tier) == [h(5), h(6)]
    assert tier.used_bytes == 85
    assert tier.evictions == 4
    tier.check_integrity()


def test_reput_touches_without_storing_again(tier: CpuTier) -> None:
    put(tier, 1, 40)
    put(tier, 2, 40)
    created = peek(tier, 1).created
    assert put(tier, 1, 40) == []
    assert order(tier) == [h(2), h(1)]
    assert peek(tier, 1).created == created and peek(tier, 1).last_access > created
    assert (tier.used_bytes, tier.bytes_in, len(tier)) == (80, 80, 2)
    assert put(tier, 3, 40) == [h(2)]
    tier.check_integrity()


def test_exact_fit_and_oversize(tier: CpuTier) -> None:
    assert put(tier, 1, 100) == []
    assert tier.used_bytes == 100
    with pytest.raises(Overloaded, match="capacity"):
        put(tier, 2, 101)
    # The failed put changed nothing.
    assert order(tier) == [h(1)]
    assert (tier.used_bytes, tier.evictions, tier.bytes_in) == (100, 0, 100)
    assert put(tier, 3, 1) == [h(1)]
    tier.check_integrity()


def test_peek_contains_and_lookup_do_not_touch_or_count(tier: CpuTier) -> None:
    for i in range(1, 4):
        put(tier, i, 10)
    assert tier.contains(h(1)) and not tier.contains(h(9))
    assert tier.peek(h(1)) is not None and tier.peek(h(9)) is None
    assert tier.lookup_prefix([h(1), h(2), h(3)]) == 3
    assert tier.lookup_prefix([h(1), h(2), h(9), h(3)]) == 2
    assert tier.lookup_prefix([h(9), h(1)]) == 0
    assert tier.lookup_prefix([]) == 0
    assert order(tier) == [h(1), h(2), h(3)]
    assert (tier.hits, tier.misses, tier.bytes_out) == (0, 0, 0)


def test_hits_and_misses(tier: CpuTier) -> None:
    put(tier, 1, 10)
    put(tier, 2, 20)
    for block_hash in [h(1), h(1), h(2), h(3), h(4)]:
        tier.get(block_hash)
    assert (tier.hits, tier.misses, tier.bytes_out) == (3, 2, 40)
    assert (peek(tier, 1).hits, peek(tier, 2).hits) == (2, 1)


def test_integrity_holds_under_churn() -> None:
    tier = CpuTier(1000, clock=TickingClock())
    for i in range(300):
        put(tier, i, 1 + (i * 37) % 250)
        if i % 3 == 0:
            tier.get(h(i // 2))
        tier.check_integrity()
    assert tier.used_bytes <= 1000
    assert tier.stats().evictions == 300 - len(tier)


def test_check_integrity_catches_drift(tier: CpuTier) -> None:
    put(tier, 1, 10)
    tier.used_bytes += 1
    with pytest.raises(AssertionError, match="used_bytes"):
        tier.check_integrity()


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        CpuTier(0)
