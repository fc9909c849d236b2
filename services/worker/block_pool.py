"""The device's KV block pool: ids, reference counts, and the prefix cache.

    block id:   0   1   2   3   4   5   6   7
    ref_count:  2   1   0   0   1   0   0   0
    hash:       h0  h1  h2  -   -   h5  -   -
                └─ in use ┘ │   │   │   │   └─ free (uncached), FIFO
                            │   │   └ in use (partial block, no hash yet)
                            └ cached: ref 0, hash kept, reclaimable in LRU order

A block is exactly one of: free (ref 0, no hash), in use (ref > 0), or cached
(ref 0, hash kept so a later request can reuse it). `allocate` takes free blocks
first, then reclaims cached blocks least recently released first, except that a
block whose measured attention A(b) exceeds `SPARE_ATTENTION` is spared once (moved
to the recent end): the A²CR score's attention term ordering device reclamation at
O(1) per block. A reclaimed block loses its hash, and `on_reclaim` (if set) sees it
first, its slots still intact, so the engine can offload it to the memory tiers. `check_integrity`
verifies free + in use + cached == total and that the hash map and the blocks
agree; tests call it after every scenario.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass

from wicore.kv.attention import UNIFORM_ATTENTION, Observation, attention_alpha, fold_attention
from wicore.kv.hashing import BlockHash

# A block this well attended (A > 0.6: its share of attention over 1.5x uniform) gets
# a second chance before reclamation.
SPARE_ATTENTION = 0.6


class PoolExhausted(Exception):
    """Fewer blocks are free or reclaimable than asked for; nothing was taken."""


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None
    position: int = -1  # with a hash: the block's index in its sequence's chain
    attention: float = UNIFORM_ATTENTION  # A²CR's A(b) as measured on this device (see `observe`)
    observations: int = 0
    last_observation: Observation | None = None  # passed on to the tier if the block is spilled
    spared: bool = False  # skipped once by reclamation since it was last cached


@dataclass(frozen=True, slots=True)
class Reclaimed:
    block_id: int
    block_hash: BlockHash
    position: int
    last_observation: Observation | None = None


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: collections.deque[int] = collections.deque(range(num_blocks))
        self._cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
        self._by_hash: dict[BlockHash, int] = {}
        self.hits = 0  # blocks reused through the prefix cache
        self.queries = 0  # blocks looked up
        self.on_reclaim: Callable[[list[Reclaimed]], None] | None = None

    @property
    def num_free(self) -> int:
        """Blocks that `allocate` can hand out now (free + reclaimable cached)."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def hashes(self) -> frozenset[BlockHash]:
        """Every hash a new request could reuse now (cached blocks and hashed blocks in use)."""
        return frozenset(self._by_hash)

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        """n blocks with ref_count 1 (free ones first, then the least recently used cached)."""
        if n > self.num_free:
            raise PoolExhausted(f"asked for {n} blocks, {self.num_free} available")
        taken: list[int] = []
        reclaimed: list[Reclaimed] = []
        while len(taken) < n:
            if self._free:
                block = self.blocks[self._free.popleft()]
            else:
                block_id, _ = self._cached.popitem(last=False)
                block = self.blocks[block_id]
                if block.attention > SPARE_ATTENTION and not block.spared:
                    block.spared = True  # once per stay in the cache: this loop ends
                    self._cached[block_id] = None
                    continue
                assert block.block_hash is not None
                reclaimed.append(
                    Reclaimed(block_id, block.block_hash, block.position, block.last_observation)
                )
                del self._by_hash[block.block_hash]
                block.block_hash = None
                block.position = -1
            block.ref_count = 1
            block.attention, block.observations, block.spared = UNIFORM_ATTENTION, 0, False
            block.last_observation = None
            taken.append(block.block_id)
        if reclaimed and self.on_reclaim is not None:
            self.on_reclaim(reclaimed)
        return taken

    def release(self, block_ids: list[int]) -> None:
        """Drops one reference from each; unreferenced blocks become cached (if hashed) or free.

        Pass a sequence's blocks in order: later blocks of a sequence are released
        first, so under pressure its tail is reclaimed before its shared prefix.
        """
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise ValueError(f"block {block_id} released more times than it was taken")
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is None:
                    self._free.append(block_id)
                else:
                    self._cached[block_id] = None

    def longest_cached_prefix(self, hashes: list[BlockHash]) -> list[int]:
        """Block ids holding the longest prefix of `hashes`; each gets one more reference."""
        found: list[int] = []
        for h in hashes:
            block_id = self._by_hash.get(h)
            if block_id is None:
                break
            found.append(block_id)
        self.queries += len(hashes)
        self.hits += len(found)
        for block_id in found:
            self._ref(block_id)
        return found

    def observe(self, block_id: int, observation: Observation) -> float:
        """Folds an attention observation into the block's A (the tier policy's estimator)."""
        block = self.blocks[block_id]
        block.observations += 1
        block.last_observation = observation
        weight = attention_alpha(block.observations)
        block.attention = fold_attention(
            block.attention, weight, observation.mass, observation.blocks_in_sequence
        )
        return block.attention

    def hold(self, hashes: list[BlockHash]) -> list[int]:
        """One more reference on each of these blocks that is in the pool (no hit counted), so
        they cannot be reclaimed until `release`d; returns their ids."""
        held = [self._by_hash[h] for h in hashes if h in self._by_hash]
        for block_id in held:
            self._ref(block_id)
        return held

    def contains(self, block_hash: BlockHash) -> bool:
        return block_hash in self._by_hash

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._cached[block_id]
            block.spared = False
        block.ref_count += 1

    def register(self, block_id: int, block_hash: BlockHash, position: int = -1) -> None:
        """Marks a full, in-use block as holding `block_hash` so later requests can reuse it.

        If another block already holds the same hash, this one stays unhashed (a
        duplicate, freed normally); the first keeps serving hits.
        """
        block = self.blocks[block_id]
        if block.ref_count <= 0:
            raise ValueError(f"block {block_id} is not in use")
        if block.block_hash is not None or block_hash in self._by_hash:
            return
        block.block_hash = block_hash
        block.position = position
        self._by_hash[block_hash] = block_id

    def check_integrity(self) -> None:
        in_use = [b for b in self.blocks if b.ref_count > 0]
        cached = [b for b in self.blocks if b.ref_count == 0 and b.block_hash is not None]
        free = [b for b in self.blocks if b.ref_count == 0 and b.block_hash is None]
        if any(b.ref_count < 0 for b in self.blocks):
            raise AssertionError("negative reference count")
        if len(free) + len(in_use) + len(cached) != self.num_blocks:
            raise AssertionError("free + in use + cached != total")
        if sorted(self._free) != [b.block_id for b in free] or len(set(self._free)) != len(self._free):
            raise AssertionError(
                f"free list {sorted(self._free)} != free blocks {[b.block_id for b in free]}"
            )
        if sorted(self._cached) != [b.block_id for b in cached]:
            raise AssertionError("cached list disagrees with the blocks")
        hashed = {b.block_hash: b.block_id for b in self.blocks if b.block_hash is not None}
        if hashed != self._by_hash:
            raise AssertionError("hash map disagrees with the blocks")
