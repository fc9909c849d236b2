"""The tier manager: one index over the CPU and NVMe tiers, the eviction policy, and the Redis mirror.

    put ──► CPU tier (cpu_codec) ──demote (policy victims)──► NVMe tier (nvme_codec)
              ▲                                                   │
              └────────────── promote on a hit / Prefetch ◄───────┘
                                                 NVMe full: lowest scores deleted

- Every stored block has one `Entry` (its policy statistics) and a copy in the CPU
  tier, on NVMe, or both: a promoted block keeps its NVMe file, so demoting it
  again costs nothing. A block's *tier* is the faster one holding it.
- Room is made by the policy (`wicore.tier.policy`): a put or promotion that does
  not fit frees the tier down to its low watermark; the cleanup loop (every
  `a2cr_config.cleanup_interval`) re-tunes the policy to the tier's pressure,
  demotes CPU blocks scoring below the threshold, enforces the high watermark on
  both tiers, and re-scores every block into Redis.
- Changes take `_lock` (one writer at a time; encoding and file I/O run on threads
  while it is held); reads of CPU blocks do not.
- Redis is a mirror, never in the way: changed blocks are marked dirty and written
  by `flush` in one MULTI per call; a failed write or a flushed Redis (its sentinel
  key gone) makes the next successful flush rewrite everything (`BlockMetadata`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from wicore.config import A2crConfig, TierConfig
from wicore.errors import Overloaded
from wicore.hashing import BlockHash
from wicore.kvblock import KvPayload, transcode
from wicore.tier.metadata import BlockMetadata, BlockRecord
from wicore.tier.nvme import HEADER_SIZE, NvmeBlockMeta, NvmeTier
from wicore.tier.policy import (
    BlockStats,
    EvictionPolicy,
    TunedParams,
    below_threshold,
    bytes_to_free,
    make_policy,
    observe_attention,
    room_to_make,
    select_victims,
    select_victims_redundant_first,
)
from wicore.tier.store import CpuTier, StorageTier, TierStats
from wicore.tier_wire import Observation

log = logging.getLogger(__name__)
_R = TypeVar("_R")


@dataclass(slots=True)
class Entry:
    stats: BlockStats  # size_bytes: the copy in the fastest tier
    nvme: bool = False  # a durable copy exists on NVMe


@dataclass(frozen=True, slots=True)
class PutResult:
    stored: list[BlockHash]
    evicted: list[BlockHash]  # blocks that left every tier to make room


@dataclass(frozen=True, slots=True)
class PrefetchResult:
    promoted: int
    already_cpu: int
    missing: int


@dataclass(frozen=True, slots=True)
class ManagerStats:
    tiers: list[TierStats]
    policy: str
    params: dict[StorageTier, TunedParams | None]
    blocks_demoted: int
    bytes_demoted: int
    blocks_promoted: int
    bytes_promoted: int
    corrupt_blocks: int
    redis_ok: bool
    nvme_write_errors: int = 0  # NVMe writes that failed (no space, I/O error): no NVMe copy kept


class TierManager:
    """Owns both tiers' contents and every block's statistics (see the module docstring)."""

    def __init__(
        self,
        config: TierConfig,
        a2cr: A2crConfig,
        metadata: BlockMetadata | None,
        nvme_root: Path | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if config.cpu_capacity_bytes == 0 and config.nvme_capacity_bytes == 0:
            raise ValueError("tier: cpu_capacity_bytes and nvme_capacity_bytes are both 0: nowhere to store")
        self.config = config
        self.metadata = metadata
        self._clock = clock
        self.cpu = CpuTier(config.cpu_capacity_bytes) if config.cpu_capacity_bytes else None
        self.nvme: NvmeTier | None = None
        if config.nvme_capacity_bytes:
            if nvme_root is None:
                raise ValueError("tier: nvme_capacity_bytes > 0 needs an NVMe directory")
            self.nvme = NvmeTier(
                nvme_root, config.nvme_capacity_bytes, config.io_depth, config.use_o_direct, clock
            )
        self.policies: dict[StorageTier, EvictionPolicy] = {
            tier: make_policy(config.policy, a2cr, clock) for tier in StorageTier
        }
        self._entries: dict[BlockHash, Entry] = {}
        self._dirty: set[BlockHash] = set()
        self._lock = asyncio.Lock()
        self._codec_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tier-codec")
        self.blocks_demoted = self.bytes_demoted = self.blocks_promoted = self.bytes_promoted = 0
        self.nvme_write_errors = 0

    # --- lifecycle ---

    async def recover(self) -> int:
        """Indexes the NVMe tier's files (orphans and invalid files removed), restores their
        statistics from Redis where it still has them, and rewrites Redis from this state.
        Returns the number of blocks recovered."""
        if self.nvme is None:
            await self._resync()
            return 0
        metas = await self.nvme.arecover()
        saved = await self.metadata.load([m.block_hash for m in metas]) if self.metadata else {}
        for meta in metas:
            fields = saved.get(meta.block_hash, {})
            stats = BlockStats(
                meta.block_hash,
                meta.file_bytes,
                created=meta.created,
                last_access=_field(fields, "last_access", meta.created),
                hits=int(_field(fields, "hits", 0)),
                attention=min(1.0, max(0.0, _field(fields, "attention", 0.5))),
                observations=max(0, int(_field(fields, "observations", 0))),
            )
            self._entries[meta.block_hash] = Entry(stats, nvme=True)
        await self._resync()
        return len(metas)

    async def shutdown(self) -> None:
        """Drops the CPU copies (they die with the process), updates Redis, stops the I/O threads."""
        async with self._lock:
            if self.cpu is not None:
                for block_hash in self.cpu.hashes():
                    self._drop_cpu_copy(block_hash)
        await self.flush()
        if self.nvme is not None:
            self.nvme.close()
        self._codec_pool.shutdown(wait=True)

    # --- the RPCs' operations ---

    async def put(self, blocks: Sequence[tuple[BlockHash, KvPayload]]) -> PutResult:
        """Stores blocks (checksums already verified) in the CPU tier, or on NVMe when there is none."""
        stored: list[BlockHash] = []
        evicted: list[BlockHash] = []
        async with self._lock:
            for block_hash, block in blocks:
                entry = self._entries.get(block_hash)
                if entry is None:
                    evicted += await self._insert(block_hash, block)
                else:  # a hash names its content: already stored
                    self._touch(block_hash, entry)
                stored.append(block_hash)
        return PutResult(stored, [h for h in evicted if h not in self._entries])

    async def get(self, hashes: Sequence[BlockHash]) -> list[tuple[BlockHash, KvPayload, StorageTier]]:
        """The blocks present, in request order, each with the tier it came from.

        NVMe hits are read concurrently, checksum-verified (a corrupt file is deleted and
        counts as a miss), and promoted to the CPU tier.
        """
        found: dict[BlockHash, tuple[KvPayload, StorageTier]] = {}
        from_nvme: list[BlockHash] = []
        for block_hash in dict.fromkeys(hashes):
            entry = self._entries.get(block_hash)
            block = self.cpu.get(block_hash) if self.cpu is not None else None
            if self.cpu is not None:
                self._count_cpu(block)
            if entry is not None and block is not None:
                found[block_hash] = (block, StorageTier.CPU)
                self._touch(block_hash, entry)
            elif entry is not None and entry.nvme:
                from_nvme.append(block_hash)
            elif self.nvme is not None:
                self.nvme.misses += 1
        read = await self._read_nvme(from_nvme)
        for block_hash, block in read.items():
            found[block_hash] = (block, StorageTier.NVME)
            entry = self._entries.get(block_hash)
            if entry is not None:
                self._touch(block_hash, entry)
        if read and self.cpu is not None:
            async with self._lock:
                await self._promote(read)
        return [(h, *found[h]) for h in dict.fromkeys(hashes) if h in found]

    def lookup(self, hashes: Sequence[BlockHash]) -> list[StorageTier]:
        """The tier of each leading block of the chain that is present (no statistics change)."""
        tiers: list[StorageTier] = []
        for block_hash in hashes:
            tier = self.tier_of(block_hash)
            if tier is None:
                break
            tiers.append(tier)
        return tiers

    async def prefetch(self, hashes: Sequence[BlockHash]) -> PrefetchResult:
        """Promotes blocks that sit only on NVMe to the CPU tier, ahead of a GetBlocks."""
        wanted = list(dict.fromkeys(hashes))
        where = {h: self.tier_of(h) for h in wanted}
        in_cpu = [h for h, t in where.items() if t is StorageTier.CPU]
        on_nvme = [h for h, t in where.items() if t is StorageTier.NVME]
        promoted = 0
        for block_hash in in_cpu + on_nvme:  # a request is about to read them: an access
            self._touch(block_hash, self._entries[block_hash])
        if on_nvme and self.cpu is not None:
            read = await self._read_nvme(on_nvme, count=False)
            async with self._lock:
                promoted = await self._promote(read)
        missing = len(wanted) - len(in_cpu) - len(on_nvme)
        return PrefetchResult(promoted, len(in_cpu), missing + (len(on_nvme) - promoted if self.cpu else 0))

    def update_scores(self, observations: Iterable[Observation]) -> int:
        """Folds attention observations into the blocks' A values; returns how many blocks were known."""
        known = 0
        for obs in observations:
            entry = self._entries.get(obs.block_hash)
            if entry is not None:
                observe_attention(entry.stats, obs.mass, obs.blocks_in_sequence)
                self._dirty.add(obs.block_hash)
                known += 1
        return known

    async def drop(self, hashes: Sequence[BlockHash]) -> int:
        """Removes blocks from every tier; returns how many were stored."""
        dropped = 0
        async with self._lock:
            for block_hash in dict.fromkeys(hashes):
                entry = self._entries.get(block_hash)
                if entry is None:
                    continue
                if self.cpu is not None:
                    self.cpu.pop(block_hash)
                if entry.nvme and self.nvme is not None:
                    await self._nvme_call(self.nvme.delete, block_hash)
                self._forget(block_hash)
                dropped += 1
        return dropped

    async def cleanup(self) -> None:
        """One cleanup pass (see the module docstring), then a full re-score in Redis."""
        async with self._lock:
            if self.cpu is not None:
                policy = self.policies[StorageTier.CPU]
                policy.tune(self.cpu.used_bytes / self.cpu.capacity_bytes)
                cpu_blocks = self._tier_stats(StorageTier.CPU)
                victims = below_threshold(policy, cpu_blocks)
                need = bytes_to_free(self.cpu.used_bytes, self.cpu.capacity_bytes, *self._watermarks)
                if need > 0:
                    chosen = {b.block_hash for b in victims}
                    victims += [
                        b for b in select_victims(policy, cpu_blocks, need) if b.block_hash not in chosen
                    ]
                await self._demote([b.block_hash for b in victims])
            if self.nvme is not None:
                policy = self.policies[StorageTier.NVME]
                policy.tune(self.nvme.used_bytes / self.nvme.capacity_bytes)
                need = bytes_to_free(self.nvme.used_bytes, self.nvme.capacity_bytes, *self._watermarks)
                await self._evict_nvme(need, exclude=set())
        await self.flush()
        if self.metadata is not None:  # recency decayed for every block: only the scores change
            await self.metadata.write_scores(self._scores)

    def _scores(self) -> dict[StorageTier, dict[BlockHash, float]]:
        """Every block's current score in each tier holding a copy."""
        scores: dict[StorageTier, dict[BlockHash, float]] = {tier: {} for tier in StorageTier}
        cpu = self.cpu
        score_cpu, score_nvme = self.policies[StorageTier.CPU].score, self.policies[StorageTier.NVME].score
        for block_hash, entry in self._entries.items():
            if cpu is not None and cpu.contains(block_hash):
                scores[StorageTier.CPU][block_hash] = score_cpu(entry.stats)
            if entry.nvme:
                scores[StorageTier.NVME][block_hash] = score_nvme(entry.stats)
        return scores

    async def flush(self) -> None:
        """Writes the dirty blocks' state to Redis (or everything, when Redis needs a resync)."""
        if self.metadata is None:
            self._dirty.clear()
            return
        if self.metadata.needs_resync:
            await self._resync()
            return
        dirty, self._dirty = self._dirty, set()
        present = [self._record(h) for h in dirty if h in self._entries]
        gone = [h for h in dirty if h not in self._entries]
        await self.metadata.write(present, gone)
        if self.metadata.needs_resync:  # the write found Redis flushed or failed
            await self._resync()

    # --- queries ---

    def tier_of(self, block_hash: BlockHash) -> StorageTier | None:
        entry = self._entries.get(block_hash)
        if entry is None:
            return None
        if self.cpu is not None and self.cpu.contains(block_hash):
            return StorageTier.CPU
        return StorageTier.NVME if entry.nvme else None

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> ManagerStats:
        tiers: list[TierStats] = []
        if self.cpu is not None:
            c = self.cpu
            tiers.append(
                TierStats(StorageTier.CPU, self.config.cpu_codec, c.capacity_bytes, c.used_bytes, len(c),
                          c.hits, c.misses, c.bytes_in, c.bytes_out, c.evictions)
            )  # fmt: skip
        if self.nvme is not None:
            n = self.nvme.stats()
            tiers.append(TierStats(StorageTier.NVME, self.config.nvme_codec, n.capacity_bytes,
                                   n.used_bytes, n.blocks, n.hits, n.misses, n.bytes_in, n.bytes_out,
                                   n.evictions))  # fmt: skip
        return ManagerStats(
            tiers=tiers,
            policy=self.config.policy,
            params={tier: p.params for tier, p in self.policies.items()},
            blocks_demoted=self.blocks_demoted,
            bytes_demoted=self.bytes_demoted,
            blocks_promoted=self.blocks_promoted,
            bytes_promoted=self.bytes_promoted,
            corrupt_blocks=self.nvme.corrupt if self.nvme is not None else 0,
            redis_ok=self.metadata.redis_ok if self.metadata is not None else False,
            nvme_write_errors=self.nvme_write_errors,
        )

    def check_integrity(self) -> None:
        """Raises AssertionError unless the index and both tiers agree."""
        cpu = set(self.cpu.hashes()) if self.cpu is not None else set()
        if self.cpu is not None:
            self.cpu.check_integrity()
        nvme = {h for h, e in self._entries.items() if e.nvme}
        if self.nvme is not None:
            self.nvme.check_integrity()
            on_disk = {h for h in self._entries if self.nvme.contains(h)}
            if on_disk != nvme:
                raise AssertionError(f"NVMe index {sorted(on_disk)} != entries {sorted(nvme)}")
        if not cpu <= set(self._entries) or set(self._entries) != cpu | nvme:
            raise AssertionError(
                f"entries {sorted(self._entries)} != cpu {sorted(cpu)} | nvme {sorted(nvme)}"
            )

    # --- mechanics (the caller holds _lock) ---

    @property
    def _watermarks(self) -> tuple[float, float]:
        return self.config.high_watermark, self.config.low_watermark

    async def _insert(self, block_hash: BlockHash, block: KvPayload) -> list[BlockHash]:
        now = self._clock()
        if self.cpu is not None:
            encoded = await self._transcode(block, self.config.cpu_codec)
            if encoded.nbytes > self.cpu.capacity_bytes:
                raise Overloaded(
                    f"block {block_hash}: {encoded.nbytes} bytes exceed the CPU tier's capacity "
                    f"of {self.cpu.capacity_bytes}"
                )
            evicted = await self._make_cpu_room(encoded.nbytes)
            self.cpu.put(block_hash, encoded)
            self._entries[block_hash] = Entry(BlockStats(block_hash, encoded.nbytes, now, now))
        else:
            assert self.nvme is not None
            encoded = await self._transcode(block, self.config.nvme_codec)
            if HEADER_SIZE + encoded.nbytes > self.nvme.capacity_bytes:
                raise Overloaded(
                    f"block {block_hash}: {encoded.nbytes} bytes exceed the NVMe tier's capacity "
                    f"of {self.nvme.capacity_bytes}"
                )
            evicted = await self._write_nvme({block_hash: encoded}, created=now)
            if block_hash not in self._entries:
                raise Overloaded(f"block {block_hash}: the NVMe tier could not store it")
        self._touch(block_hash, self._entries[block_hash])
        return evicted

    async def _make_cpu_room(self, size: int) -> list[BlockHash]:
        """Demotes the policy's victims until `size` more bytes fit, down to the low watermark."""
        assert self.cpu is not None
        cpu = self.cpu
        target = room_to_make(cpu.used_bytes, size, cpu.capacity_bytes, self.config.low_watermark)
        if target <= 0:
            return []
        victims = select_victims(self.policies[StorageTier.CPU], self._tier_stats(StorageTier.CPU), target)
        return await self._demote([v.block_hash for v in victims])

    async def _demote(self, hashes: list[BlockHash]) -> list[BlockHash]:
        """Moves CPU blocks to NVMe (those without a copy there are written first); returns the
        blocks that left every tier because NVMe is absent or could not take them."""
        assert self.cpu is not None
        if not hashes:
            return []
        to_write: dict[BlockHash, KvPayload] = {}
        if self.nvme is not None:
            for block_hash in hashes:
                block = self.cpu.get(block_hash)
                if block is not None and not self._entries[block_hash].nvme:
                    to_write[block_hash] = await self._transcode(block, self.config.nvme_codec)
            await self._write_nvme(to_write, created=None)
        lost: list[BlockHash] = []
        for block_hash in hashes:
            block = self.cpu.pop(block_hash)
            if block is None:
                continue
            self.cpu.evictions += 1
            entry = self._entries[block_hash]
            if entry.nvme:
                written = to_write.get(block_hash)
                entry.stats.size_bytes = self.nvme.sizes_of(block_hash) if self.nvme is not None else 0
                if written is not None:  # a block with a copy already there moves no bytes
                    self.blocks_demoted += 1
                    self.bytes_demoted += entry.stats.size_bytes
                self._dirty.add(block_hash)
            else:
                self._forget(block_hash)
                lost.append(block_hash)
        return lost

    @staticmethod
    def _nvme_disk_full(nvme: NvmeTier) -> None:
        """The filesystem filled before `nvme_capacity_bytes`: what the tier holds is then its real
        capacity, so the next demotions evict the lowest scores to make room instead of failing
        one by one. (Until a restart; a disk full of other files leaves an empty tier as it is.)"""
        if 0 < nvme.used_bytes < nvme.capacity_bytes:
            log.warning(
                "the NVMe directory is full at %d bytes (capacity was %d); using that as its capacity",
                nvme.used_bytes, nvme.capacity_bytes,
            )  # fmt: skip
            nvme.capacity_bytes = nvme.used_bytes

    async def _write_nvme(self, blocks: dict[BlockHash, KvPayload], created: float | None) -> list[BlockHash]:
        """Writes blocks to NVMe concurrently after making room; marks their entries.

        Returns the blocks evicted from NVMe that left every tier. A block that
        cannot be written (no room, I/O error) is logged and left without an NVMe copy.
        """
        assert self.nvme is not None
        if not blocks:
            return []
        nvme = self.nvme
        incoming = sum(HEADER_SIZE + b.nbytes for b in blocks.values())
        taken = nvme.capacity_bytes - nvme.free_bytes  # stored and reserved by writes in flight
        need = room_to_make(taken, incoming, nvme.capacity_bytes, self.config.low_watermark)
        lost = await self._evict_nvme(need, set(blocks))
        metas = {h: self._nvme_meta(h, b, created) for h, b in blocks.items()}
        results = await asyncio.gather(
            *(self.nvme.aput(metas[h], b.payload) for h, b in blocks.items()), return_exceptions=True
        )
        for (block_hash, block), result in zip(blocks.items(), results, strict=True):
            if isinstance(result, BaseException):
                log.warning("NVMe write of block %s failed: %s", block_hash, result)
                self.nvme_write_errors += 1
                if isinstance(result, OSError) and result.errno == errno.ENOSPC:
                    self._nvme_disk_full(nvme)
                continue
            entry = self._entries.get(block_hash)
            if entry is None:  # a put straight to NVMe (no CPU tier)
                t = metas[block_hash].created
                entry = self._entries[block_hash] = Entry(
                    BlockStats(block_hash, HEADER_SIZE + block.nbytes, t, t)
                )
            entry.nvme = True
            self._dirty.add(block_hash)
        return lost

    async def _evict_nvme(self, need: int, exclude: set[BlockHash]) -> list[BlockHash]:
        """Deletes NVMe files to free `need` bytes; returns the blocks that thereby left every tier.

        Copies of blocks that are also in the CPU tier go first (dropping one loses nothing
        now), each group lowest NVMe score first.
        """
        if need <= 0 or self.nvme is None:
            return []
        candidates = [b for b in self._tier_stats(StorageTier.NVME) if b.block_hash not in exclude]
        in_cpu = self.cpu.hashes() if self.cpu is not None else []
        chosen = select_victims_redundant_first(
            self.policies[StorageTier.NVME], candidates, need, set(in_cpu)
        )
        victims = [v.block_hash for v in chosen]
        lost: list[BlockHash] = []
        for block_hash in await self._nvme_call(self.nvme.evict, victims):
            self._entries[block_hash].nvme = False
            if self.cpu is not None and self.cpu.contains(block_hash):
                self._dirty.add(block_hash)
            else:
                self._forget(block_hash)
                lost.append(block_hash)
        return lost

    async def _promote(self, blocks: dict[BlockHash, KvPayload]) -> int:
        """Copies NVMe blocks into the CPU tier as they are (their NVMe codec); returns how many."""
        assert self.cpu is not None
        promoted = 0
        for block_hash, block in blocks.items():
            entry = self._entries.get(block_hash)
            if entry is None or self.cpu.contains(block_hash) or block.nbytes > self.cpu.capacity_bytes:
                continue
            await self._make_cpu_room(block.nbytes)
            if block_hash not in self._entries:  # lost while making room
                continue
            self.cpu.put(block_hash, block)
            entry.stats.size_bytes = block.nbytes
            self.blocks_promoted += 1
            self.bytes_promoted += block.nbytes
            self._dirty.add(block_hash)
            promoted += 1
        return promoted

    async def _read_nvme(self, hashes: list[BlockHash], count: bool = True) -> dict[BlockHash, KvPayload]:
        """Reads NVMe blocks concurrently; a block found missing or corrupt loses its NVMe copy.
        `count`: the reads serve a client (hits and bytes out), not a prefetch."""
        if not hashes or self.nvme is None:
            return {}
        results = await self.nvme.aget_many(hashes, count)
        read: dict[BlockHash, KvPayload] = {}
        for block_hash, result in zip(hashes, results, strict=True):
            if result is not None:
                meta, payload = result
                read[block_hash] = KvPayload(meta.codec, meta.lz4, meta.dtype, meta.shape, meta.sink_tokens,
                                             payload, meta.checksum)  # fmt: skip
                continue
            entry = self._entries.get(block_hash)
            if entry is not None and entry.nvme and not self.nvme.contains(block_hash):
                entry.nvme = False
                if self.cpu is None or not self.cpu.contains(block_hash):
                    self._forget(block_hash)
                self._dirty.add(block_hash)
        return read

    def _nvme_meta(self, block_hash: BlockHash, block: KvPayload, created: float | None) -> NvmeBlockMeta:
        entry = self._entries.get(block_hash)
        if created is None:
            created = entry.stats.created if entry is not None else self._clock()
        return NvmeBlockMeta(block_hash, block.codec, block.dtype, block.shape, block.nbytes, block.checksum,
                             block.sink_tokens, block.lz4, created)  # fmt: skip

    def _drop_cpu_copy(self, block_hash: BlockHash) -> None:
        assert self.cpu is not None
        self.cpu.pop(block_hash)
        entry = self._entries[block_hash]
        if entry.nvme:
            self._dirty.add(block_hash)
        else:
            self._forget(block_hash)

    def _forget(self, block_hash: BlockHash) -> None:
        self._entries.pop(block_hash, None)
        self._dirty.add(block_hash)

    def _touch(self, block_hash: BlockHash, entry: Entry) -> None:
        self.policies[StorageTier.CPU].touch(entry.stats)
        self._dirty.add(block_hash)

    def _count_cpu(self, block: KvPayload | None) -> None:
        assert self.cpu is not None
        if block is None:
            self.cpu.misses += 1
        else:
            self.cpu.hits += 1
            self.cpu.bytes_out += block.nbytes

    def _tier_stats(self, tier: StorageTier) -> list[BlockStats]:
        """The blocks of one tier, each with that tier's copy size (copies: the policy reads them only)."""
        if tier is StorageTier.CPU:
            assert self.cpu is not None
            entries = self._entries
            return [dataclasses.replace(entries[h].stats, size_bytes=b.nbytes) for h, b in self.cpu.items()]
        assert self.nvme is not None
        sizes = self.nvme.sizes()
        return [dataclasses.replace(e.stats, size_bytes=sizes[h]) for h, e in self._entries.items() if e.nvme]

    async def _transcode(self, block: KvPayload, codec: str) -> KvPayload:
        if block.codec == codec:
            return block
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._codec_pool, lambda: transcode(block, codec, use_lz4=self.config.use_lz4)
        )

    async def _nvme_call(self, fn: Callable[..., _R], *args: object) -> _R:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def _record(self, block_hash: BlockHash) -> BlockRecord:
        entry = self._entries[block_hash]
        cpu_copy = self.cpu.get(block_hash) if self.cpu is not None else None
        in_cpu = cpu_copy is not None
        stats = entry.stats
        scores: dict[StorageTier, float] = {}
        if in_cpu:
            scores[StorageTier.CPU] = self.policies[StorageTier.CPU].score(stats)
        if entry.nvme:
            scores[StorageTier.NVME] = self.policies[StorageTier.NVME].score(stats)
        return BlockRecord(
            block_hash=block_hash,
            tier=StorageTier.CPU if in_cpu else StorageTier.NVME,
            nvme_copy=entry.nvme,
            size_bytes=stats.size_bytes,
            codec=cpu_copy.codec if cpu_copy is not None else self.config.nvme_codec,
            created=stats.created,
            last_access=stats.last_access,
            hits=stats.hits,
            attention=stats.attention,
            observations=stats.observations,
            scores=scores,
        )

    async def _resync(self) -> None:
        if self.metadata is None:
            return
        self._dirty.clear()
        await self.metadata.resync([self._record(h) for h in list(self._entries)])


def _field(fields: dict[str, str], name: str, default: float) -> float:
    try:
        return float(fields[name])
    except (KeyError, ValueError):
        return default
