"""BlockPool: exact block ids, reclamation order, reference counts, integrity."""

from __future__ import annotations

import pytest

from wicore.kv.attention import Observation
from wicore.kv.hashing import BlockHash
from wicore.worker.block_pool import BlockPool, PoolExhausted


def h(i: int) -> BlockHash:
    return BlockHash(f"{i:032x}")


def test_allocate_hands_out_free_blocks_in_order() -> None:
    pool = BlockPool(num_blocks=4, block_size=16)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(1) == [2]
    assert pool.num_free == 1
    pool.check_integrity()
    with pytest.raises(PoolExhausted):
        pool.allocate(2)
    assert pool.num_free == 1  # a failed allocation takes nothing
    pool.check_integrity()


def test_released_hashed_blocks_stay_cached_and_are_reused() -> None:
    pool = BlockPool(num_blocks=4, block_size=16)
    a = pool.allocate(2)
    pool.register(a[0], h(1))
    pool.register(a[1], h(2))
    pool.release(a)
    assert (pool.num_cached, pool.num_free) == (2, 4)
    pool.check_integrity()
    hit = pool.longest_cached_prefix([h(1), h(2), h(3)])
    assert hit == [0, 1]
    assert (pool.hits, pool.queries) == (2, 3)
    assert [pool.blocks[i].ref_count for i in hit] == [1, 1]
    assert pool.num_cached == 0
    pool.check_integrity()


def test_prefix_stops_at_the_first_missing_hash() -> None:
    pool = BlockPool(num_blocks=4, block_size=16)
    a = pool.allocate(3)
    for block_id, i in zip(a, (1, 2, 3), strict=True):
        pool.register(block_id, h(i))
    pool.release(a)
    assert pool.longest_cached_prefix([h(1), h(9), h(3)]) == [0]
    pool.check_integrity()


def test_free_blocks_go_before_cached_and_cached_go_least_recently_released_first() -> None:
    pool = BlockPool(num_blocks=5, block_size=16)
    first = pool.allocate(2)  # [0, 1]
    second = pool.allocate(2)  # [2, 3]
    for block_id in (*first, *second):
        pool.register(block_id, h(10 + block_id))
    pool.release(second)  # released first: 3 then 2 (a sequence's tail goes first)
    pool.release(first)  # then 1, 0
    pool.check_integrity()
    # Block 4 was never used: it goes first. Then cached in release order: 3, 2, 1, 0.
    assert pool.allocate(1) == [4]
    assert pool.allocate(3) == [3, 2, 1]
    assert pool.blocks[3].block_hash is None  # a reclaimed block forgets its hash
    assert pool.longest_cached_prefix([h(13)]) == []
    assert pool.longest_cached_prefix([h(10)]) == [0]
    pool.check_integrity()


def test_a_hit_refreshes_recency() -> None:
    pool = BlockPool(num_blocks=2, block_size=16)
    blocks = pool.allocate(2)
    pool.register(blocks[0], h(1))
    pool.register(blocks[1], h(2))
    pool.release([blocks[0]])
    pool.release([blocks[1]])  # LRU order now: 0, 1
    pool.release(pool.longest_cached_prefix([h(1)]))  # 0 used again: order 1, 0
    assert pool.allocate(1) == [1]
    pool.check_integrity()


def test_shared_blocks_are_freed_only_by_their_last_user() -> None:
    pool = BlockPool(num_blocks=3, block_size=16)
    (b,) = pool.allocate(1)
    pool.register(b, h(1))
    assert pool.longest_cached_prefix([h(1)]) == [b]  # a second user
    pool.release([b])
    assert pool.blocks[b].ref_count == 1 and pool.num_cached == 0
    pool.release([b])
    assert pool.num_cached == 1
    with pytest.raises(ValueError, match="released more times"):
        pool.release([b])
    pool.check_integrity()


def test_a_duplicate_hash_is_not_registered_twice() -> None:
    pool = BlockPool(num_blocks=3, block_size=16)
    a, b = pool.allocate(2)
    pool.register(a, h(1))
    pool.register(b, h(1))  # same content computed twice: b stays a plain block
    assert pool.blocks[b].block_hash is None
    pool.release([a, b])
    assert (pool.num_cached, pool.num_free) == (1, 3)
    pool.check_integrity()


def test_well_attended_cached_blocks_are_spared_once_and_reclaimed_blocks_are_reported() -> None:
    pool = BlockPool(num_blocks=4, block_size=16)
    seen: list[list[tuple[int, BlockHash, int]]] = []
    pool.on_reclaim = lambda blocks: seen.append([(b.block_id, b.block_hash, b.position) for b in blocks])
    ids = pool.allocate(4)
    for position, block_id in enumerate(ids):
        pool.register(block_id, h(block_id), position)
    # block 2 took 70 % of the attention
    estimates = [pool.observe(2, Observation(h(2), 0.7, 4)) for _ in range(3)]
    assert estimates[0] < 0.6 < estimates[2]  # one sample is not enough to be spared, three are
    assert pool.observe(1, Observation(h(1), 0.05, 4)) < 0.5
    pool.release(ids)  # cached tail first: LRU order 3, 2, 1, 0
    assert pool.allocate(1) == [3]
    assert pool.allocate(1) == [1]  # 2 is spared once: moved to the recent end
    assert pool.blocks[2].spared and pool.blocks[2].block_hash == h(2)
    assert pool.allocate(2) == [0, 2]  # its chance is spent
    assert seen == [[(3, h(3), 3)], [(1, h(1), 1)], [(0, h(0), 0), (2, h(2), 2)]]
    assert pool.blocks[2].attention == 0.5 and pool.blocks[2].observations == 0  # reset for its new owner
    pool.check_integrity()


def test_a_spared_block_that_is_reused_can_be_spared_again() -> None:
    pool = BlockPool(num_blocks=3, block_size=16)
    ids = pool.allocate(3)
    for block_id in ids:
        pool.register(block_id, h(block_id), block_id)
    for _ in range(3):
        pool.observe(0, Observation(h(0), 0.9, 3))
    pool.release(ids)  # LRU: 2, 1, 0
    assert pool.allocate(1) == [2]
    assert pool.allocate(1) == [1]  # 0 spared, goes to the recent end
    assert pool.longest_cached_prefix([h(0)]) == [0]  # reused: its chance is restored
    assert not pool.blocks[0].spared
    pool.release([0])
    pool.release([1, 2])
    assert pool.allocate(2) == [2, 1]  # free blocks first
    assert pool.blocks[0].block_hash == h(0)
    pool.check_integrity()
