"""The CPU tier: encoded KV blocks kept in this process's RAM, with byte accounting.

    CpuTier (capacity_bytes)
      _blocks: dict[BlockHash, KvPayload]     O(1) put / get / pop
      used_bytes == sum of payload lengths <= capacity_bytes

Pure mechanism: the tier never evicts on its own. The manager's policy picks
victims and pops them (demoting them to NVMe) before a put that would not fit.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from wicore.errors import Overloaded
from wicore.hashing import BlockHash
from wicore.kvblock import KvPayload


class StorageTier(enum.Enum):
    CPU = "cpu"
    NVME = "nvme"


@dataclass(frozen=True, slots=True)
class TierStats:
    tier: StorageTier
    codec: str
    capacity_bytes: int
    used_bytes: int
    blocks: int
    hits: int
    misses: int
    bytes_in: int
    bytes_out: int
    evictions: int

    @property
    def pressure(self) -> float:
        return self.used_bytes / self.capacity_bytes if self.capacity_bytes else 0.0


class CpuTier:
    """Owns the CPU tier's payloads; the counters are the manager's to bump on hits and misses."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 1:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._blocks: dict[BlockHash, KvPayload] = {}
        self.used_bytes = 0
        self.hits = self.misses = self.bytes_in = self.bytes_out = self.evictions = 0

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes

    def put(self, block_hash: BlockHash, block: KvPayload) -> None:
        """Stores a block that fits (the caller made room); a hash already present is kept as it is."""
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

    def get(self, block_hash: BlockHash) -> KvPayload | None:
        return self._blocks.get(block_hash)

    def pop(self, block_hash: BlockHash) -> KvPayload | None:
        block = self._blocks.pop(block_hash, None)
        if block is not None:
            self.used_bytes -= block.nbytes
        return block

    def contains(self, block_hash: BlockHash) -> bool:
        return block_hash in self._blocks

    def hashes(self) -> list[BlockHash]:
        return list(self._blocks)

    def items(self) -> list[tuple[BlockHash, KvPayload]]:
        return list(self._blocks.items())

    def check_integrity(self) -> None:
        """Raises AssertionError unless the byte accounting holds."""
        total = sum(block.nbytes for block in self._blocks.values())
        if total != self.used_bytes:
            raise AssertionError(f"used_bytes {self.used_bytes} != sum of payloads {total}")
        if self.used_bytes > self.capacity_bytes:
            raise AssertionError(f"used_bytes {self.used_bytes} > capacity {self.capacity_bytes}")
