"""The tier manager: one index over the storage tiers, their eviction policy, and the Redis mirror.

    put ──► tiers[0]: CPU RAM (cpu_codec) ──demote──► tiers[1]: NVMe (nvme_codec) ──evict──► gone
              ▲                                            │
              └────────── promote on a hit / Prefetch ◄────┘

- `tiers` are `BlockStore`s, fastest first (`build_tiers`: CPU RAM then NVMe, each
  only when it has a capacity). Every stored block has one `BlockStats` (its policy
  statistics, `size_bytes` that of its fastest copy) and a copy in one or more tiers;
  its *tier* is the fastest holding it. A promoted block keeps its slower copy, so
  demoting it again costs nothing.
- Room is made by each tier's policy (`wicore.tier.policy`): a put or promotion that
  does not fit frees the tier down to its low watermark. Victims of tier i move to
  tier i + 1 (transcoded to its codec) unless they have a copy there already; victims
  of the last tier are deleted, those with a copy in a faster tier first.
- The cleanup loop (every `a2cr_config.cleanup_interval`) re-tunes each tier's
  policy to its pressure, demotes the blocks of volatile tiers (RAM) scoring below
  the threshold, enforces the high watermark on every tier, and re-scores every
  block into Redis. Durable tiers (files) keep their blocks until room is needed,
  and are indexed again at start-up (`recover`).
- Changes take `_lock` (one writer at a time; encoding and file I/O run on threads
  while it is held); reads do not.
- Redis is a mirror, never in the way: every operation marks the blocks it changed
  and ends with `flush` (one MULTI); a failed write or a flushed Redis (its sentinel
  key gone) makes the next successful flush rewrite everything (`BlockMetadata`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Sequence, Set
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from wicore.config import A2crConfig, TierConfig
from wicore.errors import Overloaded
from wicore.kv.attention import Observation
from wicore.kv.block import Codec, EncodedBlock, StorageTier
from wicore.kv.codecs import transcode
from wicore.kv.hashing import BlockHash
from wicore.tier.metadata import BlockMetadata, BlockRecord, NoMetadata
from wicore.tier.nvme import NvmeTier
from wicore.tier.policy import (
    BlockStats,
    EvictionPolicy,
    TunedParams,
    admits,
    below_threshold,
    bytes_to_free,
    make_policy,
    observe_attention,
    room_to_make,
    select_victims_redundant_first,
)
from wicore.tier.store import BlockStore, CpuTier, Recovered, TierStats

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PutResult:
    stored: list[BlockHash]
    evicted: list[BlockHash]  # blocks that left every tier to make room


@dataclass(frozen=True, slots=True)
class PrefetchResult:
    promoted: int
    already_cpu: int  # already in the fastest tier
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
    nvme_write_errors: int = 0  # writes a tier refused (no space, I/O error): no copy kept there


def build_tiers(config: TierConfig, nvme_root: Path | None, clock: Callable[[], float]) -> list[BlockStore]:
    """The configured tiers, fastest first: CPU RAM, then NVMe, each if it has a capacity."""
    tiers: list[BlockStore] = []
    if config.cpu_capacity_bytes:
        tiers.append(CpuTier(config.cpu_capacity_bytes, config.cpu_codec))
    if config.nvme_capacity_bytes:
        if nvme_root is None:
            raise ValueError("tier: nvme_capacity_bytes > 0 needs an NVMe directory")
        tiers.append(NvmeTier(nvme_root, config.nvme_capacity_bytes, config.nvme_codec, config.io_depth,
                              config.use_o_direct, clock))  # fmt: skip
    if not tiers:
        raise ValueError("tier: cpu_capacity_bytes and nvme_capacity_bytes are both 0: nowhere to store")
    return tiers


class TierManager:
    """Owns every tier's contents and every block's statistics (see the module docstring)."""

    def __init__(
        self,
        config: TierConfig,
        a2cr: A2crConfig,
        metadata: BlockMetadata | None,
        nvme_root: Path | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.tiers = build_tiers(config, nvme_root, clock)
        self.metadata: BlockMetadata | NoMetadata = metadata if metadata is not None else NoMetadata()
        self._clock = clock
        self.policies: dict[StorageTier, EvictionPolicy] = {
            tier.kind: make_policy(config.policy, a2cr, clock) for tier in self.tiers
        }
        self._access = self.policies[self.tiers[0].kind]  # counts an access (every policy alike)
        self._blocks: dict[BlockHash, BlockStats] = {}
        self._dirty: set[BlockHash] = set()
        self._lock = asyncio.Lock()
        self._codec_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tier-codec")
        self.blocks_demoted = self.bytes_demoted = self.blocks_promoted = self.bytes_promoted = 0
        self.write_errors = 0

    # --- lifecycle ---

    async def recover(self) -> int:
        """Indexes the durable tiers' blocks (invalid files removed), restores their statistics
        from Redis where it still has them, and rewrites Redis from this state. Returns the
        number of blocks recovered."""
        found: dict[BlockHash, Recovered] = {}
        for tier in reversed(self.tiers):  # a faster tier's copy describes the block
            found.update((r.block_hash, r) for r in await tier.recover())
        saved = await self.metadata.load(list(found))
        for block_hash, r in found.items():
            fields = saved.get(block_hash, {})
            self._blocks[block_hash] = BlockStats(
                block_hash,
                self._fastest(block_hash).size_of(block_hash),
                created=r.created,
                last_access=_field(fields, "last_access", r.created),
                hits=int(_field(fields, "hits", 0)),
                attention=min(1.0, max(0.0, _field(fields, "attention", 0.5))),
                observations=max(0, int(_field(fields, "observations", 0))),
            )
        await self._resync()
        return len(found)

    async def shutdown(self) -> None:
        """Drops the volatile tiers' copies (they die with the process), updates Redis, stops the
        I/O threads."""
        async with self._lock:
            for tier in self.tiers:
                if not tier.durable:
                    self._copies_left(await tier.remove(list(tier.sizes()), evicted=False))
        await self.flush()
        for tier in self.tiers:
            tier.close()
        self._codec_pool.shutdown(wait=True)

    # --- the RPCs' operations (each ends with a flush of the Redis mirror) ---

    async def put(self, blocks: Iterable[tuple[BlockHash, EncodedBlock]]) -> PutResult:
        """Stores blocks (checksums already verified) in the fastest tier."""
        result = PutResult([], [])
        try:
            for block_hash, block in blocks:
                await self._put_one(block_hash, block, result)
        finally:
            await self.flush()
        return self._settle(result)

    async def put_stream(self, blocks: AsyncIterable[tuple[BlockHash, EncodedBlock]]) -> PutResult:
        """`put`, one block at a time as they arrive: a long stream never holds more than one
        block's bytes. Blocks stored before the stream fails stay stored (and mirrored)."""
        result = PutResult([], [])
        try:
            async for block_hash, block in blocks:
                await self._put_one(block_hash, block, result)
        finally:
            await self.flush()
        return self._settle(result)

    async def get(self, hashes: Sequence[BlockHash]) -> list[tuple[BlockHash, EncodedBlock, StorageTier]]:
        """The blocks present, in request order, each with the tier it came from.

        Each tier is asked for what the faster ones lacked; reads from a durable tier are
        checksum-verified (a corrupt copy is deleted and counts as a miss), and what a
        slower tier returns is promoted to the fastest: every block while that tier is below its
        low watermark, otherwise those its policy admits (`promotion_bar`, counted before this read).
        """
        wanted = list(dict.fromkeys(hashes))
        position = {h: i for i, h in enumerate(wanted)}
        now = self._clock()  # one read of a chain: one moment, its blocks ordered by position
        found: dict[BlockHash, tuple[EncodedBlock, StorageTier]] = {}
        slower: dict[BlockHash, EncodedBlock] = {}
        remaining = wanted
        bar: int | None = None  # the fastest tier's promotion bar, computed once, when needed
        bar_known = False
        for i, tier in enumerate(self.tiers):
            if not remaining:
                break
            held = {h for h in remaining if tier.contains(h)}
            missing: list[BlockHash] = []
            for block_hash, block in zip(remaining, await tier.get_many(remaining, True), strict=True):
                if block is None:
                    missing.append(block_hash)
                elif block_hash in self._blocks:
                    found[block_hash] = (block, tier.kind)
                    if i > 0:
                        if not bar_known:
                            bar, bar_known = self._promotion_bar(), True
                        if admits(bar, self._blocks[block_hash].hits):
                            slower[block_hash] = block
                    self._touch(block_hash, now, position[block_hash])
            self._copies_left([h for h in missing if h in held])  # a damaged copy, deleted on read
            remaining = missing
        if slower:
            async with self._lock:
                await self._promote(slower)
        await self.flush()
        return [(h, *found[h]) for h in wanted if h in found]

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
        """Promotes blocks held only by slower tiers to the fastest, ahead of a GetBlocks."""
        wanted = list(dict.fromkeys(hashes))
        first = self.tiers[0]
        present = [h for h in wanted if h in self._blocks]
        slower = [h for h in present if not first.contains(h)]
        in_first = len(present) - len(slower)
        now = self._clock()
        for i, block_hash in enumerate(wanted):  # a request is about to read them: an access
            if block_hash in self._blocks:
                self._touch(block_hash, now, i)
        promoted = 0
        if slower:
            read = await self._read(slower)
            async with self._lock:
                promoted = await self._promote(read)
        await self.flush()
        return PrefetchResult(promoted, in_first, len(wanted) - in_first - promoted)

    async def update_scores(self, observations: Iterable[Observation]) -> int:
        """Folds attention observations into the blocks' A values; returns how many blocks were known."""
        known = 0
        for obs in observations:
            stats = self._blocks.get(obs.block_hash)
            if stats is not None:
                observe_attention(stats, obs.mass, obs.blocks_in_sequence)
                self._dirty.add(obs.block_hash)
                known += 1
        await self.flush()
        return known

    async def drop(self, hashes: Sequence[BlockHash]) -> int:
        """Removes blocks from every tier; returns how many were stored."""
        async with self._lock:
            present = [h for h in dict.fromkeys(hashes) if h in self._blocks]
            for tier in self.tiers:
                await tier.remove(present, evicted=False)
            for block_hash in present:
                self._forget(block_hash)
        await self.flush()
        return len(present)

    async def cleanup(self) -> None:
        """One cleanup pass (see the module docstring), then a full re-score in Redis."""
        async with self._lock:
            for i, tier in enumerate(self.tiers):
                policy = self.policies[tier.kind]
                policy.tune(tier.used_bytes / tier.capacity_bytes)
                blocks = self._blocks_in(i)
                victims = [] if tier.durable else below_threshold(policy, blocks)
                need = bytes_to_free(tier.used_bytes, tier.capacity_bytes, *self._watermarks)
                if need > 0:
                    chosen = {b.block_hash for b in victims}
                    victims += [b for b in self._select(i, blocks, need) if b.block_hash not in chosen]
                await self._move_down(i, [b.block_hash for b in victims])
        await self.flush()
        # recency decayed for every block: only the scores change
        await self.metadata.write_scores(self._scores)

    async def flush(self) -> None:
        """Writes the dirty blocks' state to Redis (or everything, when Redis needs a resync)."""
        if self.metadata.needs_resync:
            await self._resync()
            return
        dirty, self._dirty = self._dirty, set()

        def changes() -> tuple[list[BlockRecord], list[BlockHash]]:
            present = [self._record(h) for h in dirty if h in self._blocks]
            return present, [h for h in dirty if h not in self._blocks]

        await self.metadata.write(changes)
        if self.metadata.needs_resync:  # the write found Redis flushed or failed
            await self._resync()

    # --- queries ---

    def tier_of(self, block_hash: BlockHash) -> StorageTier | None:
        """The fastest tier holding the block; None if it is not stored."""
        if block_hash not in self._blocks:
            return None
        return self._fastest(block_hash).kind

    def __len__(self) -> int:
        return len(self._blocks)

    def stats(self) -> ManagerStats:
        tiers = [tier.stats() for tier in self.tiers]
        return ManagerStats(
            tiers=tiers,
            policy=self.policies[self.tiers[0].kind].name,
            params={kind: p.params for kind, p in self.policies.items()},
            blocks_demoted=self.blocks_demoted,
            bytes_demoted=self.bytes_demoted,
            blocks_promoted=self.blocks_promoted,
            bytes_promoted=self.bytes_promoted,
            corrupt_blocks=sum(t.corrupt for t in tiers),
            redis_ok=self.metadata.redis_ok,
            nvme_write_errors=self.write_errors,
        )

    async def report(self) -> ManagerStats:
        """`stats`, after asking Redis whether it answers."""
        await self.metadata.ping()
        return self.stats()

    def check_integrity(self) -> None:
        """Raises AssertionError unless every tier's accounting holds and the index is the union
        of the tiers' contents."""
        held: set[BlockHash] = set()
        for tier in self.tiers:
            tier.check_integrity()
            held |= set(tier.sizes())
        if held != set(self._blocks):
            raise AssertionError(f"blocks {sorted(self._blocks)} != held by the tiers {sorted(held)}")

    # --- mechanics (the caller holds _lock) ---

    async def _put_one(self, block_hash: BlockHash, block: EncodedBlock, result: PutResult) -> None:
        async with self._lock:
            if block_hash in self._blocks:  # a hash names its content: already stored
                self._touch(block_hash)
            else:
                result.evicted.extend(await self._insert(block_hash, block))
        result.stored.append(block_hash)

    def _settle(self, result: PutResult) -> PutResult:
        """The put's result, its evicted blocks those still gone at its end."""
        return PutResult(result.stored, [h for h in result.evicted if h not in self._blocks])

    @property
    def _watermarks(self) -> tuple[float, float]:
        return self.config.high_watermark, self.config.low_watermark

    async def _insert(self, block_hash: BlockHash, block: EncodedBlock) -> list[BlockHash]:
        """Stores a new block in the fastest tier; returns the blocks that left every tier."""
        first = self.tiers[0]
        encoded = await self._transcode(block, first.codec)
        if first.footprint(encoded) > first.capacity_bytes:
            raise Overloaded(
                f"block {block_hash}: {encoded.nbytes} bytes exceed the {first.kind.label} tier's capacity "
                f"of {first.capacity_bytes}"
            )
        written, lost = await self._write(0, {block_hash: encoded}, exclude=set())
        if not written:
            raise Overloaded(f"block {block_hash}: the {first.kind.label} tier could not store it")
        self._touch(block_hash)
        return lost

    async def _write(
        self,
        i: int,
        blocks: dict[BlockHash, EncodedBlock],
        exclude: Set[BlockHash],
        leaving: Set[BlockHash] = frozenset(),
    ) -> tuple[list[BlockHash], list[BlockHash]]:
        """Writes blocks to tier i concurrently, after making room there (never by evicting
        `exclude`; `leaving`: see `_select`). Returns (the blocks written, the blocks that left
        every tier for the room). A block that cannot be written (no room, I/O error) is logged
        and gets no copy there."""
        if not blocks:
            return [], []
        tier = self.tiers[i]
        incoming = sum(map(tier.footprint, blocks.values()))
        lost = await self._make_room(i, incoming, exclude | blocks.keys(), leaving)
        now = self._clock()
        puts = [tier.put(h, b, self._created(h, now)) for h, b in blocks.items()]
        results = (
            [await _settled(puts[0])]
            if len(puts) == 1
            else await asyncio.gather(*puts, return_exceptions=True)
        )
        written: list[BlockHash] = []
        for block_hash, result in zip(blocks, results, strict=True):
            if isinstance(result, Exception):
                log.warning("%s write of block %s failed: %s", tier.kind.label, block_hash, result)
                self.write_errors += 1
                continue
            if isinstance(result, BaseException):
                raise result
            written.append(block_hash)
            if block_hash in self._blocks:
                self._refresh(block_hash)
            else:  # a new block: this tier holds its only copy
                self._blocks[block_hash] = BlockStats(block_hash, tier.size_of(block_hash), now, now)
                self._dirty.add(block_hash)
        return written, lost

    async def _make_room(
        self, i: int, size: int, exclude: Set[BlockHash], leaving: Set[BlockHash] = frozenset()
    ) -> list[BlockHash]:
        """Moves tier i's policy victims down until `size` more bytes fit, to the low watermark;
        returns the blocks that thereby left every tier."""
        tier = self.tiers[i]
        taken = tier.capacity_bytes - tier.free_bytes  # stored, and reserved by writes in flight
        need = room_to_make(taken, size, tier.capacity_bytes, self.config.low_watermark)
        if need <= 0:
            return []
        candidates = [b for b in self._blocks_in(i) if b.block_hash not in exclude]
        return await self._move_down(i, [b.block_hash for b in self._select(i, candidates, need, leaving)])

    async def _move_down(self, i: int, hashes: list[BlockHash]) -> list[BlockHash]:
        """Moves blocks out of tier i: into tier i + 1 (written first where they have no copy
        there), or out of the last tier. Returns the blocks that thereby left every tier."""
        if not hashes:
            return []
        tier = self.tiers[i]
        lost: list[BlockHash] = []
        if i + 1 < len(self.tiers):
            below = self.tiers[i + 1]
            moving = [h for h in hashes if not below.contains(h)]
            to_write = {
                h: await self._transcode(b, below.codec)
                for h, b in zip(moving, await tier.get_many(moving, False), strict=True)
                if b is not None
            }
            written, lost = await self._write(i + 1, to_write, exclude=set(), leaving=set(hashes))
            self.blocks_demoted += len(written)  # a block with a copy already there moves no bytes
            self.bytes_demoted += sum(below.size_of(h) for h in written)
        return lost + self._copies_left(await tier.remove(hashes, evicted=True))

    async def _promote(self, blocks: dict[BlockHash, EncodedBlock]) -> int:
        """Copies blocks into the fastest tier as they are (their slower tier's codec); returns how many."""
        first = self.tiers[0]
        promoted = 0
        for block_hash, block in blocks.items():
            size = first.footprint(block)
            if block_hash not in self._blocks or first.contains(block_hash) or size > first.capacity_bytes:
                continue
            await self._make_room(0, size, exclude=set())
            if block_hash not in self._blocks:  # lost while making room
                continue
            try:
                await first.put(block_hash, block, self._created(block_hash, self._clock()))
            except Exception as exc:  # a promotion is an optimisation: the slower copy still serves
                log.warning("promoting block %s failed: %s", block_hash, exc)
                continue
            self._refresh(block_hash)
            self.blocks_promoted += 1
            self.bytes_promoted += block.nbytes
            promoted += 1
        return promoted

    async def _read(self, hashes: list[BlockHash]) -> dict[BlockHash, EncodedBlock]:
        """Each block from its fastest tier (a prefetch: not counted as hits)."""
        read: dict[BlockHash, EncodedBlock] = {}
        for tier in self.tiers:
            mine = [h for h in hashes if h not in read and tier.contains(h)]
            for block_hash, block in zip(mine, await tier.get_many(mine, False), strict=True):
                if block is not None:
                    read[block_hash] = block
            self._copies_left([h for h in mine if h not in read])
        return read

    def _copies_left(self, hashes: Iterable[BlockHash]) -> list[BlockHash]:
        """After copies of these blocks were removed: forgets those no tier holds any more and
        returns them; the others now have another fastest copy."""
        gone: list[BlockHash] = []
        for block_hash in hashes:
            if block_hash not in self._blocks:
                continue
            if any(tier.contains(block_hash) for tier in self.tiers):
                self._refresh(block_hash)
            else:
                self._forget(block_hash)
                gone.append(block_hash)
        return gone

    def _refresh(self, block_hash: BlockHash) -> None:
        """The block's size is its fastest copy's; its mirror is due."""
        self._blocks[block_hash].size_bytes = self._fastest(block_hash).size_of(block_hash)
        self._dirty.add(block_hash)

    def _forget(self, block_hash: BlockHash) -> None:
        self._blocks.pop(block_hash, None)
        self._dirty.add(block_hash)

    def _promotion_bar(self) -> int | None:
        """The fastest tier's policy's `promotion_bar` over its blocks; None (promote everything)
        while that tier is below its low watermark: a promotion then displaces nothing."""
        first = self.tiers[0]
        if first.used_bytes < self.config.low_watermark * first.capacity_bytes:
            return None
        return self._access.promotion_bar(self._blocks[h] for h in first.sizes() if h in self._blocks)

    def _touch(self, block_hash: BlockHash, at: float | None = None, position: int | None = None) -> None:
        """Counts an access; `at` / `position`: the moment and index of a chain read (`get`,
        `prefetch`: hashes come first block first), so that the chain's leaves are its victims first."""
        stats = self._blocks.get(block_hash)
        if stats is not None:
            if position is not None:
                stats.position = position
            self._access.touch(stats, at)
            self._dirty.add(block_hash)

    def _created(self, block_hash: BlockHash, now: float) -> float:
        stats = self._blocks.get(block_hash)
        return stats.created if stats is not None else now

    def _fastest(self, block_hash: BlockHash) -> BlockStore:
        for tier in self.tiers:
            if tier.contains(block_hash):
                return tier
        raise KeyError(f"no tier holds block {block_hash}")

    def _blocks_in(self, i: int) -> list[BlockStats]:
        """The blocks of tier i, each with that tier's copy size (copies: the policy reads them only)."""
        blocks = self._blocks
        sizes = self.tiers[i].sizes()
        return [dataclasses.replace(blocks[h], size_bytes=size) for h, size in sizes.items() if h in blocks]

    def _select(
        self, i: int, blocks: list[BlockStats], need: int, leaving: Set[BlockHash] = frozenset()
    ) -> list[BlockStats]:
        """Tier i's victims for `need` bytes: copies of blocks a faster tier also holds first
        (dropping one loses nothing now), each group lowest score first. Blocks `leaving` the
        tier above in the demotion this room is for are not redundant: their faster copy is going."""
        faster = self.tiers[:i]
        redundant = {
            b.block_hash
            for b in blocks
            if b.block_hash not in leaving and any(t.contains(b.block_hash) for t in faster)
        }
        return select_victims_redundant_first(self.policies[self.tiers[i].kind], blocks, need, redundant)

    async def _transcode(self, block: EncodedBlock, codec: Codec) -> EncodedBlock:
        if block.header.codec is codec:
            return block
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._codec_pool, lambda: transcode(block, codec, use_lz4=self.config.use_lz4)
        )

    def _scores(self) -> dict[StorageTier, dict[BlockHash, float]]:
        """Every block's current score in each tier holding a copy."""
        scores: dict[StorageTier, dict[BlockHash, float]] = {}
        for tier in self.tiers:
            score = self.policies[tier.kind].score
            blocks = self._blocks
            scores[tier.kind] = {h: score(blocks[h]) for h in tier.sizes() if h in blocks}
        return scores

    def _record(self, block_hash: BlockHash) -> BlockRecord:
        stats = self._blocks[block_hash]
        holders = [tier for tier in self.tiers if tier.contains(block_hash)]
        return BlockRecord(
            block_hash=block_hash,
            tier=holders[0].kind,
            nvme_copy=any(tier.kind is StorageTier.NVME for tier in holders),
            size_bytes=stats.size_bytes,
            codec=holders[0].codec_of(block_hash),
            created=stats.created,
            last_access=stats.last_access,
            hits=stats.hits,
            attention=stats.attention,
            observations=stats.observations,
            scores={tier.kind: self.policies[tier.kind].score(stats) for tier in holders},
        )

    async def _resync(self) -> None:
        self._dirty.clear()
        await self.metadata.resync(lambda: [self._record(h) for h in list(self._blocks)])


async def _settled(call: Awaitable[None]) -> BaseException | None:
    """`call`'s exception or None, as gather(return_exceptions=True) gives them (a lone call
    needs no task: a put to RAM then costs no trip through the event loop)."""
    try:
        await call
    except Exception as exc:
        return exc
    return None


def _field(fields: dict[str, str], name: str, default: float) -> float:
    try:
        return float(fields[name])
    except (KeyError, ValueError):
        return default
