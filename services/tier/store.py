"""The CPU tier: spilled KV blocks kept losslessly in this process's RAM.

    CpuTier (capacity_bytes)
      _blocks: OrderedDict[BlockHash, StoredBlock]
                 oldest access ........................ newest access
                 [h_a] [h_b] [h_c] ... [h_z]
                   ^ evicted first         ^ put / get move a block here

Eviction is plain LRU for now; the A²CR policy (DESIGN.md §4) replaces the
ordering in a later issue. Pure Python, no gRPC and no Redis: the servicer
converts messages and the metadata mirror writes Redis.
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from wicore.errors import Overloaded
from wicore.hashing import BlockHash


class StorageTier(enum.Enum):
    CPU = "cpu"


class Codec(enum.Enum):
    RAW = "raw"  # the tensor bytes as they are (lossless)


@dataclass(slots=True)
class StoredBlock:
    """One block's payload and its bookkeeping; `payload` is never modified."""

    block_hash: BlockHash
    codec: Codec
    dtype: str
    shape: tuple[int, ...]
    payload: bytes
    checksum: str
    created: float
    last_access: float
    hits: int = 0

    @property
    def nbytes(self) -> int:
        return len(self.payload)


@dataclass(frozen=True, slots=True)
class TierStats:
    tier: StorageTier
    capacity_bytes: int
    used_bytes: int
    blocks: int
    hits: int
    misses: int
    bytes_in: int
    bytes_out: int
    evictions: int


class CpuTier:
    """Owns the CPU tier's blocks; `used_bytes == sum of payloads <= capacity_bytes` always.

    `put` of a hash already present only touches it (a hash names its content),
    `get` touches and counts a hit or a miss, `contains`/`peek`/`lookup_prefix`
    do neither.
    """

    def __init__(self, capacity_bytes: int, clock: Callable[[], float] = time.time) -> None:
        if capacity_bytes < 1:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._clock = clock
        self._blocks: OrderedDict[BlockHash, StoredBlock] = OrderedDict()
        self.used_bytes = 0
        self.hits = 0
        self.misses = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def put(
        self,
        block_hash: BlockHash,
        codec: Codec,
        dtype: str,
        shape: Sequence[int],
        payload: bytes,
        checksum: str,
    ) -> list[BlockHash]:
        """Stores a block, evicting least recently used ones until it fits; returns those evicted."""
        now = self._clock()
        existing = self._blocks.get(block_hash)
        if existing is not None:
            self._touch(existing, now)
            return []
        size = len(payload)
        if size > self.capacity_bytes:
            raise Overloaded(
                f"block {block_hash}: {size} bytes exceed the CPU tier's capacity of {self.capacity_bytes}"
            )
        evicted: list[BlockHash] = []
        while self.used_bytes + size > self.capacity_bytes:
            old_hash, old = self._blocks.popitem(last=False)
            self.used_bytes -= old.nbytes
            self.evictions += 1
            evicted.append(old_hash)
        self._blocks[block_hash] = StoredBlock(
            block_hash, codec, dtype, tuple(shape), payload, checksum, created=now, last_access=now
        )
        self.used_bytes += size
        self.bytes_in += size
        return evicted

    def get(self, block_hash: BlockHash) -> StoredBlock | None:
        """The block (touched, a hit), or None (a miss)."""
        block = self._blocks.get(block_hash)
        if block is None:
            self.misses += 1
            return None
        self._touch(block, self._clock())
        block.hits += 1
        self.hits += 1
        self.bytes_out += block.nbytes
        return block

    def peek(self, block_hash: BlockHash) -> StoredBlock | None:
        return self._blocks.get(block_hash)

    def contains(self, block_hash: BlockHash) -> bool:
        return block_hash in self._blocks

    def lookup_prefix(self, hashes: Sequence[BlockHash]) -> int:
        """How many leading hashes of a chain are all present."""
        for i, block_hash in enumerate(hashes):
            if block_hash not in self._blocks:
                return i
        return len(hashes)

    def hashes(self) -> list[BlockHash]:
        """Every stored hash, least recently used first."""
        return list(self._blocks)

    def stats(self) -> TierStats:
        return TierStats(
            tier=StorageTier.CPU,
            capacity_bytes=self.capacity_bytes,
            used_bytes=self.used_bytes,
            blocks=len(self._blocks),
            hits=self.hits,
            misses=self.misses,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            evictions=self.evictions,
        )

    def check_integrity(self) -> None:
        """Raises AssertionError unless the byte accounting and the index agree."""
        total = sum(block.nbytes for block in self._blocks.values())
        if total != self.used_bytes:
            raise AssertionError(f"used_bytes {self.used_bytes} != sum of payloads {total}")
        if self.used_bytes > self.capacity_bytes:
            raise AssertionError(f"used_bytes {self.used_bytes} > capacity {self.capacity_bytes}")
        for key, block in self._blocks.items():
            if key != block.block_hash:
                raise AssertionError(f"block {block.block_hash} filed under {key}")

    def _touch(self, block: StoredBlock, now: float) -> None:
        block.last_access = now
        self._blocks.move_to_end(block.block_hash)
