"""Which blocks the scheduler asks each tier to promote ahead of a request."""

from __future__ import annotations

import pytest

from wicore.kv.block import StorageTier
from wicore.kv.hashing import BlockHash
from wicore.scheduler.state import PrefixInfo

H = tuple(BlockHash(f"{i:032x}") for i in range(6))
CPU, NVME = StorageTier.CPU, StorageTier.NVME


def test_nvme_blocks_after_the_best_device_prefix_until_the_first_gap() -> None:
    info = PrefixInfo(H, "fp", 16, {"w1": 1, "w2": 2}, {"a": (None, NVME, NVME, CPU, NVME, None)})
    assert info.to_prefetch() == {"a": [H[2], H[4]]}  # 0-1 on w2's device; 5 is nowhere


def test_a_gap_ends_the_prefix() -> None:
    info = PrefixInfo(H, "fp", 16, {}, {"a": (NVME, None, NVME, NVME, NVME, NVME)})
    assert info.to_prefetch() == {"a": [H[0]]}


def test_each_tier_gets_its_own_blocks() -> None:
    info = PrefixInfo(
        H, "fp", 16, {}, {"a": (NVME, NVME, None, *(NVME,) * 3), "b": (CPU, CPU, NVME, *(None,) * 3)}
    )
    assert info.to_prefetch() == {"a": [H[0], H[1]], "b": [H[2]]}


def test_nothing_without_redis_answers_or_nvme_blocks() -> None:
    assert PrefixInfo(H, "fp", 16, {}, {}).to_prefetch() == {}
    assert PrefixInfo(H, "fp", 16, {"w": 6}, {"a": (NVME,) * 6}).to_prefetch() == {}  # all on a device
    assert PrefixInfo(H, "fp", 16, {}, {"a": (CPU,) * 6}).to_prefetch() == {}


def test_a_device_count_beyond_the_chain_is_refused() -> None:
    with pytest.raises(ValueError, match=r"device\['w'\] = 7 is outside \[0, 6\]"):
        PrefixInfo(H, "fp", 16, {"w": 7}, {})


def test_a_tier_list_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(ValueError, match=r"tiers\['a'\] has 2 entries for 6 hashes"):
        PrefixInfo(H, "fp", 16, {}, {"a": (CPU, CPU)})
