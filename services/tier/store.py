"""The interface every storage tier implements, and the CPU tier.

    TierManager.tiers:  [ CpuTier (RAM, volatile) , NvmeTier (files, durable) , ... ]
                          fastest first; a block leaves tier i for tier i + 1

A tier is pure mechanism: it stores, returns and removes encoded blocks and counts
what it did. It never evicts on its own and knows no policy, no Redis and no other
tier; the manager decides what goes where. A third tier (a remote store, say) is one
more class with these methods.

    CpuTier (capacity_bytes)
      _blocks: dict[BlockHash, EncodedBlock]     O(1) put / get / remove
      used_bytes == sum of payload lengths <= capacity_bytes
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from wicore.errors import Overloaded
from wicore.kv.block import Codec, EncodedBlock, StorageTier
from wicore.kv.hashing import BlockHash


@dataclass(frozen=True, slots=True)
class TierStats:
    tier: StorageTier
    codec: Codec  # what the manager encodes blocks in for this tier
    capacity_bytes: int
    used_bytes: int
    blocks: int
    hits: int
    misses: int
    bytes_in: int
    bytes_out: int
    evictions: int
    corrupt: int = 0  # stored blocks found damaged (deleted, never served)

    @property
    def pressure(self) -> float:
        return self.used_bytes / self.capacity_bytes if self.capacity_bytes else 0.0


@dataclass(frozen=True, slots=True)
class Recovered:
    """A block a durable tier found at start-up."""

    block_hash: BlockHash
    size_bytes: int
    created: float


class BlockStore(Protocol):
    """One storage tier. Sizes are what a block occupies in this tier (`footprint`)."""

    kind: StorageTier
    codec: Codec  # blocks are stored in this codec (promoted copies may keep a slower tier's)
    durable: bool  # survives a restart: `recover` finds its blocks; a volatile tier is emptied
    capacity_bytes: int

    @property
    def used_bytes(self) -> int: ...

    @property
    def free_bytes(self) -> int:
        """Capacity not used nor reserved by writes in flight."""
        ...

    def footprint(self, block: EncodedBlock) -> int: ...

    def contains(self, block_hash: BlockHash) -> bool: ...

    def size_of(self, block_hash: BlockHash) -> int:
        """The block's footprint here; 0 if it is not stored."""
        ...

    def sizes(self) -> dict[BlockHash, int]:
        """Every stored block's footprint (a copy)."""
        ...

    def codec_of(self, block_hash: BlockHash) -> Codec: ...

    async def put(self, block_hash: BlockHash, block: EncodedBlock, created: float) -> None:
        """Stores a block (a hash already stored is kept as it is). Overloaded if it does not
        fit (the caller makes room first), OSError if the medium fails: then nothing is stored."""
        ...

    async def get_many(self, hashes: Sequence[BlockHash], count: bool) -> list[EncodedBlock | None]:
        """Each block, in order, or None (not stored, or found damaged: then removed).
        `count`: hits, misses and bytes out serve a client (not a prefetch)."""
        ...

    async def remove(self, hashes: Sequence[BlockHash], evicted: bool) -> list[BlockHash]:
        """Removes blocks; returns those that were stored. `evicted` counts them as evictions."""
        ...

    async def recover(self) -> list[Recovered]:
        """The blocks a durable tier holds at start-up (its index rebuilt); [] for a volatile one."""
        ...

    def stats(self) -> TierStats: ...

    def check_integrity(self) -> None: ...

    def close(self) -> None: ...


class CpuTier:
    """Owns the CPU tier's blocks in this process's RAM (volatile)."""

    kind = StorageTier.CPU
    durable = False

    def __init__(self, capacity_bytes: int, codec: Codec) -> None:
        if capacity_bytes < 1:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.codec = codec
        self._blocks: dict[BlockHash, EncodedBlock] = {}
        self.used_bytes = 0
        self.hits = self.misses = self.bytes_in = self.bytes_out = self.evictions = 0

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes

    def footprint(self, block: EncodedBlock) -> int:
        return block.nbytes

    def contains(self, block_hash: BlockHash) -> bool:
        return block_hash in self._blocks

    def size_of(self, block_hash: BlockHash) -> int:
        block = self._blocks.get(block_hash)
        return block.nbytes if block is not None else 0

    def sizes(self) -> dict[BlockHash, int]:
        return {h: b.nbytes for h, b in self._blocks.items()}

    def codec_of(self, block_hash: BlockHash) -> Codec:
        return self._blocks[block_hash].header.codec

    async def put(self, block_hash: BlockHash, block: EncodedBlock, created: float) -> None:
        if block_hash in self._blocks:
            return
        if block.nbytes > self.free_bytes:
            raise Overloaded(
                f"block {block_hash}: {block.nbytes} bytes do not fit the CPU tier "
                f"({self.free_bytes} of {self.capacity_bytes} free)"
            )
        self._blocks[block_hash] = block
        self.used_bytes += block.nbytes
        self.bytes_in += block.nbytes

    async def get_many(self, hashes: Sequence[BlockHash], count: bool) -> list[EncodedBlock | None]:
        found = [self._blocks.get(h) for h in hashes]
        if count:
            for block in found:
                if block is None:
                    self.misses += 1
                else:
                    self.hits += 1
                    self.bytes_out += block.nbytes
        return found

    async def remove(self, hashes: Sequence[BlockHash], evicted: bool) -> list[BlockHash]:
        removed: list[BlockHash] = []
        for block_hash in hashes:
            block = self._blocks.pop(block_hash, None)
            if block is not None:
                self.used_bytes -= block.nbytes
                removed.append(block_hash)
        if evicted:
            self.evictions += len(removed)
        return removed

    async def recover(self) -> list[Recovered]:
        return []

    def stats(self) -> TierStats:
        return TierStats(self.kind, self.codec, self.capacity_bytes, self.used_bytes, len(self._blocks),
                         self.hits, self.misses, self.bytes_in, self.bytes_out, self.evictions)  # fmt: skip

    def check_integrity(self) -> None:
        """Raises AssertionError unless the byte accounting holds."""
        total = sum(block.nbytes for block in self._blocks.values())
        if total != self.used_bytes:
            raise AssertionError(f"used_bytes {self.used_bytes} != sum of payloads {total}")
        if self.used_bytes > self.capacity_bytes:
            raise AssertionError(f"used_bytes {self.used_bytes} > capacity {self.capacity_bytes}")

    def close(self) -> None:
        self._blocks.clear()
        self.used_bytes = 0
