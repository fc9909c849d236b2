"""KV offload: device blocks the pool reclaims go to the tier service; prefixes come back.

    engine thread                         event loop (this module)                tier service
    ─────────────                         ────────────────────────                ────────────
    pool reclaims cached blocks ──spill──▶ pending[hash] = host copy ──PutBlocks─▶ CPU / NVMe
                                           (dropped once acknowledged,
                                            or abandoned if the tier fails)
    admission of a request     ◀─install─ load(chain): pending, then ◀─Lookup + GetBlocks─
                                           one Lookup and one GetBlocks per request

- A reclaimed block is copied to host memory before the pool reuses its slots, so
  decode steps never wait on the tier; the copy stays in `pending` (and serves
  reloads) until the tier acknowledges it. At most `max_pending_blocks` wait: past
  that, the oldest are abandoned (counted), never blocking the engine.
- `load` returns the longest run of a request's chain after its device prefix that
  can be brought back and is worth it: a leading run of tier blocks is loaded only as far
  as loading saves time over recomputing, both as measured on this worker (costs.py); a
  tier measured slower is not loaded from, but tried again every 16th time, to measure it
  again. Concurrent requests for the same blocks share one load; a
  block evicted between Lookup and GetBlocks just ends the run (the rest is
  recomputed). With the tier down, `load` returns nothing at once.
- The first block of a sequence is sent with `SINK_TOKENS` attention-sink tokens,
  which lossy tier codecs keep at fp16.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from wicore.kv.attention import Observation
from wicore.kv.block import Codec, EncodedBlock, StorageTier
from wicore.kv.client import TierClient
from wicore.kv.codecs import decode, encode
from wicore.kv.hashing import BlockHash
from wicore.worker.costs import EXPLORE_EVERY, CostMeter, blocks_worth_loading
from wicore.worker.kv_io import Spilled
from wicore.worker.threads import confined_executor

log = logging.getLogger(__name__)

SINK_TOKENS = 4
PUT_BATCH_BLOCKS = 16
MAX_OBSERVATIONS = 4096  # per UpdateScores (the tier's limit); older ones are dropped


@dataclass(slots=True)
class Reload:
    """What one `load` brought back: the KV of the leading run of blocks, and where each came
    from (`pending`: a spill not yet acknowledged; `shared`: another request's load in flight;
    `cpu` / `nvme`: the tier that served it, with the bytes that travelled)."""

    kv: list[torch.Tensor] = field(default_factory=list)
    blocks: collections.Counter[str] = field(default_factory=collections.Counter)
    bytes: collections.Counter[str] = field(default_factory=collections.Counter)


@dataclass(slots=True)
class OffloadStats:
    spilled: int = 0  # blocks the tier acknowledged
    spill_failed: int = 0  # blocks abandoned (tier down, refused, or too many pending)
    loaded_pending: int = 0  # blocks a reload took from spills not yet acknowledged
    loaded: dict[StorageTier, int] = field(default_factory=lambda: {StorageTier.CPU: 0, StorageTier.NVME: 0})
    declined: int = 0  # tier blocks recomputed instead: loading them measured slower (costs.py)


class KvOffloader:
    def __init__(
        self,
        client: TierClient,
        codec: Codec,
        max_pending_blocks: int = 256,
        *,
        block_size: int = 16,
        costs: CostMeter | None = None,
        measured_loads: bool = True,
    ) -> None:
        self.client = client
        self.codec = codec
        self.max_pending_blocks = max_pending_blocks
        self.block_size = block_size
        self.costs = costs or CostMeter()  # the engine's: its prefill speed, and the loads timed here
        self.measured_loads = measured_loads  # False: load every block found (worker.tier_loads always)
        self._declines = 0  # load runs cut short because loading measured slower than recomputing
        self.stats = OffloadStats()
        self._pending: collections.OrderedDict[BlockHash, Spilled] = collections.OrderedDict()
        self._queue: collections.deque[BlockHash] = collections.deque()
        self._loading: dict[BlockHash, asyncio.Future[torch.Tensor | None]] = {}
        self._observations: list[Observation] = []
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        # Encoding and decoding off the event loop, without OpenMP threads of their own (threads.py).
        self._codec = confined_executor("tier-codec")

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._codec.shutdown(wait=False)
        await self.client.close()

    # --- engine thread side ---

    def spill(self, blocks: list[Spilled]) -> None:
        """Called on the engine thread with host copies of blocks the pool is reclaiming."""
        if self._loop is not None and blocks:
            self._loop.call_soon_threadsafe(self._enqueue, blocks)

    def observe(self, observations: list[Observation]) -> None:
        """Called on the engine thread with attention observations of cached blocks."""
        if self._loop is not None and observations:
            self._loop.call_soon_threadsafe(self._add_observations, observations)

    # --- event loop side ---

    async def load(self, chain: Sequence[BlockHash]) -> Reload:
        """KV [layers, 2, B, Hkv, D] of the longest leading run of `chain` found off the device."""
        reload = Reload()
        found = reload.kv
        while len(found) < len(chain):
            i = len(found)
            spilled = self._pending.get(chain[i])
            if spilled is not None:  # a spill not yet acknowledged
                found.append(spilled.kv)
                reload.blocks["pending"] += 1
                self.stats.loaded_pending += 1
                continue
            if chain[i] in self._loading:  # another request is loading these: share that load
                futures = [
                    self._loading[h] for h in itertools.takewhile(self._loading.__contains__, chain[i:])
                ]
                for future in futures:
                    kv = await future
                    if kv is None:
                        return reload
                    found.append(kv)
                    reload.blocks["shared"] += 1
                continue
            if not self.client.available:
                break
            tiers = await self.client.lookup(chain[i:])
            if chain[i] in self._loading or chain[i] in self._pending:
                continue  # it changed hands while we looked
            recompute_s = (
                self.costs.prefill_s_per_token.value * self.block_size if self.measured_loads else 0.0
            )
            worth = blocks_worth_loading(tiers, self.costs.load_seconds(), recompute_s)
            if worth < len(tiers):
                self._declines += 1
                if self._declines % EXPLORE_EVERY == 0:  # measure the slow tier again now and then
                    worth = len(tiers)
            self.stats.declined += len(tiers) - worth
            wanted = list(itertools.takewhile(lambda h: h not in self._loading, chain[i : i + worth]))
            if not wanted:
                break
            loaded = await self._fetch(wanted, reload)
            found += loaded
            if len(loaded) < len(wanted) or worth < len(tiers):
                break
        return reload

    async def _fetch(self, wanted: list[BlockHash], reload: Reload) -> list[torch.Tensor]:
        """One GetBlocks for `wanted`: the decoded leading run that arrived (others await it too)."""
        loop = asyncio.get_running_loop()
        futures = {h: loop.create_future() for h in wanted}
        self._loading.update(futures)
        decoded: list[torch.Tensor] = []
        try:
            started = loop.time()
            got = await self.client.get(wanted)
            run = list(itertools.takewhile(lambda h: h in got, wanted))
            decoded = await loop.run_in_executor(self._codec, _decode_all, [got[h][0] for h in run])
            sources: collections.Counter[StorageTier] = collections.Counter()
            for h in run:
                block, source = got[h]
                sources[source] += 1
                self.stats.loaded[source] += 1
                reload.blocks[source.value] += 1
                reload.bytes[source.value] += block.nbytes
            self.costs.record_load(loop.time() - started, sources)
        finally:
            for j, h in enumerate(wanted):
                if not futures[h].done():
                    futures[h].set_result(decoded[j] if j < len(decoded) else None)
                del self._loading[h]
        return decoded

    def _enqueue(self, blocks: list[Spilled]) -> None:
        for block in blocks:
            if block.block_hash in self._pending:
                continue
            self._pending[block.block_hash] = block
            self._queue.append(block.block_hash)
        while len(self._pending) > self.max_pending_blocks:  # the tier cannot keep up: abandon the oldest
            self._pending.popitem(last=False)
            self.stats.spill_failed += 1
        self._wake.set()

    def _add_observations(self, observations: list[Observation]) -> None:
        self._observations += observations
        self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._send_observations()
            while self._queue:
                hashes = [self._queue.popleft() for _ in range(min(PUT_BATCH_BLOCKS, len(self._queue)))]
                blocks = [self._pending[h] for h in hashes if h in self._pending]
                if not blocks:
                    continue
                try:
                    encoded = await loop.run_in_executor(self._codec, self._encode_all, blocks)
                    ok = await self.client.put(encoded)
                except Exception:  # a block that cannot be encoded is not offloaded; serving goes on
                    log.exception("spilling %d blocks failed", len(blocks))
                    ok = False
                for block in blocks:
                    self._pending.pop(block.block_hash, None)
                if ok:
                    self.stats.spilled += len(blocks)
                    # The tier knows these blocks now: pass on what the device measured.
                    self._observations += [b.observation for b in blocks if b.observation is not None]
                else:
                    self.stats.spill_failed += len(blocks)
            await self._send_observations()

    async def _send_observations(self) -> None:
        if self._observations:
            batch, self._observations = self._observations[-MAX_OBSERVATIONS:], []
            await self.client.update_scores(batch)

    def _encode_all(self, blocks: list[Spilled]) -> list[tuple[BlockHash, EncodedBlock]]:
        return [
            (b.block_hash, encode(b.kv, self.codec, sink_tokens=SINK_TOKENS if b.position == 0 else 0))
            for b in blocks
        ]


def _decode_all(blocks: list[EncodedBlock]) -> list[torch.Tensor]:
    return [decode(b) for b in blocks]
