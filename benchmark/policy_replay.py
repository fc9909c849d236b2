"""Replays seeded traces through a two-level KV store (CPU RAM, NVMe) under A²CR, LRU and
LFU, and compares hit rates and bytes moved between the tiers; `--policies ...,belady` adds
an offline reference that knows the whole trace (`Belady`: no real tier can run it).

    python benchmark/policy_replay.py [--workload replay|multiround] [--cpu-blocks 500]
        [--nvme-blocks 4000] [--seeds 0] [--policies a2cr,lru,lfu[,belady]] --json OUT

`--workload replay` (the default; `make_trace`), a request being the chain of block
hashes of its sequence:
- tenants (Zipf popularity) each have a system prompt that prefixes all their chat
  and document requests: hot, and attended strongly;
- documents: per-tenant corpus, Zipf popularity, 32-160 blocks, asked about now and
  then (system prompt + document + one question block);
- chat sessions: Poisson arrivals, ~6 turns; each turn re-reads system prompt + the
  whole history and appends 2-5 blocks (user message, reply); 80 % of the gaps
  are short (mean 30 s), 20 % the user comes back later (mean 15 min);
- one-off prompts: 1-8 unique blocks, 70 % behind their tenant's system prompt.
`--workload multiround` (`make_multiround_trace`): LMCache's multi-round QA. 32 users
share a 4-block system prompt; a user's first turn brings its own 16-32 block context,
each turn re-reads system prompt + the whole history and appends a question (1-2
blocks) and its answer (2-4); 8 rounds, each visiting every user once in a seeded
shuffled order (a user returns after 0 to 62 others), Poisson arrivals 2 s apart. It
stores 1,940 blocks (seed 0), 3.9 times a 500-block CPU tier.
Attention assumptions (share of a request's decode attention mass per block): the
first block of a sequence is an attention sink (weight 8), other system-prompt
blocks 2, the newest turn / question 1.5, chat history 0.5 + 0.5·0.6^turns_back,
document blocks 1 near the ends and 0.6 in the middle ("lost in the middle"), one-off
blocks 1; times log-normal noise (sigma 0.4), normalised per request.

The store (`replay`), one policy instance per tier, the trace's time as the clock, the
mechanics of services/tier/manager.py (one `BlockStats` per block, shared by its copies):

    request: h0 h1 ... hn   the leading run of stored blocks is reused (the engine's
                            Lookup): CPU hit; NVMe hit -> read, and copied into CPU (its
                            file stays) unless CPU is at its low watermark and the policy
                            does not admit it (`promotion_bar`); from the first missing
                            block on, every block is recomputed: a stored one is a "hole"
                            (counted as a miss, touched: the worker puts it again), a new
                            one is written to CPU; every block touched at the request's
                            time with its position in the chain, then observe_attention
    after each request      CPU  >= 90 % -> lowest scores demoted down to 80 % (written to
                            NVMe unless a copy is there already)
                            NVMe >= 90 % -> copies of blocks also in CPU dropped first, then
                            the lowest scores, down to 80 % (`--copies` for the alternatives)
    every cleanup_interval  tune(pressure now) per tier; CPU blocks below the threshold
                            demoted (A²CR only: LRU/LFU have no threshold); watermarks

Policies are tuned at the cleanup only: sampled when a write crosses the high watermark,
the pressure is >= 0.9 by construction and A²CR would always run at decay 0.1/s.
`hit_rate.total` counts the blocks the engine reuses (the leading run, CPU or NVMe);
`hit_rate.stored` also the holes (stored, but behind a missing block: what a per-block
count would call a hit). Bytes moved = written to NVMe + read from NVMe (promoted or
served from there). A block that leaves both tiers loses its statistics (no ghost
entries), for every policy. Every policy evicts a chain's deepest block first among
blocks read at the same moment (`wicore.tier.policy`).

    python benchmark/policy_replay.py --seeds 0,1,2 --cpu-blocks 250,500,1000,2000
    python benchmark/policy_replay.py --workload multiround --seeds 0,1,2 --cpu-blocks 250,500 \
        --nvme-blocks 1000,4000
    python benchmark/policy_replay.py --workload multiround --seeds 0,1,2 --cpu-blocks 250,500 \
        --nvme-blocks 4000 --policies a2cr,lru,belady
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import heapq
import itertools
import random
import statistics
import sys
from bisect import bisect_right
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wicore.config import A2crConfig
from wicore.kv.hashing import BlockHash
from wicore.tier.policy import (
    BlockStats,
    EvictionPolicy,
    admits,
    below_threshold,
    bytes_to_free,
    make_policy,
    observe_attention,
    select_victims,
    select_victims_redundant_first,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json

# One 16-token block of SmolLM2-135M in fp16: 30 layers x (K, V) x 3 KV heads x 64 x 16 x 2 bytes.
BLOCK_BYTES = 30 * 2 * 3 * 64 * 16 * 2
LOW_WATERMARK = 0.8  # `bytes_to_free`'s default, as the tier's
SINK, SYSTEM, NEWEST, DOC_EDGE, DOC_MIDDLE, ONE_OFF = 8.0, 2.0, 1.5, 1.0, 0.6, 1.0
CLASSES = ("sys", "doc", "chat", "oneoff")
POLICIES = ("a2cr", "lru", "lfu")
# A²CR with other settings, for `--policies` (name -> the a2cr_config changes)
VARIANTS: dict[str, dict[str, Any]] = {
    # the performance guide's weights: measured attention and short-horizon recency take part
    "a2cr-guide": {"attention_weight": 0.4, "frequency_weight": 0.3, "recency_weight": 0.3},
    "a2cr-no-admission": {"promotion_admission": False},  # every NVMe hit is promoted
}
BELADY = "belady"  # the offline reference (`Belady`), for `--policies`


@dataclass(frozen=True)
class TraceParams:
    seed: int = 0
    duration_s: float = 3600.0
    tenants: int = 8
    tenant_zipf: float = 1.2
    system_blocks: tuple[int, int] = (4, 24)
    documents_per_tenant: int = 40
    document_blocks: tuple[int, int] = (32, 160)
    document_zipf: float = 1.1
    sessions_per_s: float = 0.15
    mean_turns: float = 6.0
    documents_per_s: float = 0.2
    one_offs_per_s: float = 0.3


@dataclass(frozen=True, slots=True)
class Request:
    time: float
    blocks: tuple[str, ...]  # "class:...": the class names the workload the block belongs to
    mass: tuple[float, ...]  # share of the request's attention mass, sums to 1


@dataclass(frozen=True)
class Trace:
    requests: list[Request]
    block_bytes: int
    params: TraceParams | MultiRoundParams


def _arrivals(rng: random.Random, rate: float, duration: float) -> list[float]:
    times, t = [], rng.expovariate(rate)
    while t < duration:
        times.append(t)
        t += rng.expovariate(rate)
    return times


def _request(rng: random.Random, time: float, blocks: list[str], weights: list[float]) -> Request:
    weights = [SINK, *weights[1:]]  # the first block of any sequence is an attention sink
    noisy = [w * rng.lognormvariate(0.0, 0.4) for w in weights]
    total = sum(noisy)
    return Request(time, tuple(blocks), tuple(w / total for w in noisy))


class _Generator:
    def __init__(self, p: TraceParams) -> None:
        self.p, self.rng = p, random.Random(p.seed)
        self.tenant_w = [1 / (i + 1) ** p.tenant_zipf for i in range(p.tenants)]
        self.system = [
            [f"sys:t{t}:{i}" for i in range(self.rng.randint(*p.system_blocks))] for t in range(p.tenants)
        ]
        self.doc_len = [
            [self.rng.randint(*p.document_blocks) for _ in range(p.documents_per_tenant)]
            for _ in range(p.tenants)
        ]
        self.doc_w = [1 / (d + 1) ** p.document_zipf for d in range(p.documents_per_tenant)]
        self.questions = 0

    def tenant(self) -> int:
        return self.rng.choices(range(self.p.tenants), self.tenant_w)[0]

    def chat(self, start: float, session: int) -> list[Request]:
        rng, t, tenant = self.rng, start, self.tenant()
        sys_blocks = self.system[tenant]
        history: list[tuple[str, int]] = []  # (hash, turn)
        out, turn = [], 0
        while t < self.p.duration_s:
            new = [f"chat:t{tenant}:s{session}:{len(history) + j}" for j in range(rng.randint(2, 5))]
            weights = [SYSTEM] * len(sys_blocks) + [0.5 + 0.5 * 0.6 ** (turn - k) for _, k in history]
            out.append(
                _request(rng, t, sys_blocks + [h for h, _ in history] + new, weights + [NEWEST] * len(new))
            )
            history += [(h, turn) for h in new]
            turn += 1
            if rng.random() < 1.0 / self.p.mean_turns:
                break
            t += rng.expovariate(1 / 30.0) if rng.random() < 0.8 else rng.expovariate(1 / 900.0)
        return out

    def document(self, time: float) -> Request:
        tenant = self.tenant()
        doc = self.rng.choices(range(self.p.documents_per_tenant), self.doc_w)[0]
        n, edge = self.doc_len[tenant][doc], self.doc_len[tenant][doc] // 10
        blocks = [f"doc:t{tenant}:d{doc}:{i}" for i in range(n)]
        weights = [DOC_EDGE if i < edge or i >= n - edge else DOC_MIDDLE for i in range(n)]
        self.questions += 1
        question = f"oneoff:q{self.questions}"
        sys_blocks = self.system[tenant]
        return _request(
            self.rng, time, [*sys_blocks, *blocks, question], [SYSTEM] * len(sys_blocks) + weights + [NEWEST]
        )

    def one_off(self, time: float, index: int) -> Request:
        sys_blocks = self.system[self.tenant()] if self.rng.random() < 0.7 else []
        own = [f"oneoff:o{index}:{i}" for i in range(self.rng.randint(1, 8))]
        return _request(self.rng, time, sys_blocks + own, [SYSTEM] * len(sys_blocks) + [ONE_OFF] * len(own))


def make_trace(params: TraceParams | None = None, block_bytes: int = BLOCK_BYTES) -> Trace:
    p = params or TraceParams()
    gen = _Generator(p)
    requests: list[Request] = []
    for session, start in enumerate(_arrivals(gen.rng, p.sessions_per_s, p.duration_s)):
        requests += gen.chat(start, session)
    requests += [gen.document(t) for t in _arrivals(gen.rng, p.documents_per_s, p.duration_s)]
    requests += [gen.one_off(t, i) for i, t in enumerate(_arrivals(gen.rng, p.one_offs_per_s, p.duration_s))]
    requests.sort(key=lambda r: r.time)
    return Trace(requests, block_bytes, p)


@dataclass(frozen=True)
class MultiRoundParams:
    """LMCache's multi-round QA, scaled to blocks: `users` share one system prompt; each
    user's first turn brings its own context (LMCache's user history prompt), every turn
    re-reads system prompt + the whole history and appends a question and its answer.
    Rounds visit every user once, in a seeded shuffled order, so a user comes back after
    between 0 and 2·(users - 1) other users' turns. Requests arrive as a Poisson process
    (mean gap `mean_gap_s`: the users' turns queue behind each other)."""

    seed: int = 0
    users: int = 32
    rounds: int = 8
    system_blocks: int = 4
    context_blocks: tuple[int, int] = (16, 32)
    question_blocks: tuple[int, int] = (1, 2)
    answer_blocks: tuple[int, int] = (2, 4)
    mean_gap_s: float = 2.0


def make_multiround_trace(params: MultiRoundParams | None = None, block_bytes: int = BLOCK_BYTES) -> Trace:
    """Attention as in `make_trace`'s chat: sink 8, system 2, history 0.5 + 0.5·0.6^turns_back
    (the context is turn 0), the new turn (question + answer, or the context) 1.5."""
    p = params or MultiRoundParams()
    rng = random.Random(p.seed)
    system = [f"sys:mr:{i}" for i in range(p.system_blocks)]
    history: list[list[tuple[str, int]]] = [[] for _ in range(p.users)]  # per user: (hash, turn)
    requests, t = [], 0.0
    for turn in range(p.rounds):
        order = list(range(p.users))
        rng.shuffle(order)
        for user in order:
            t += rng.expovariate(1.0 / p.mean_gap_s)
            past = history[user]
            size = rng.randint(*p.question_blocks) + rng.randint(*p.answer_blocks)
            if turn == 0:
                size += rng.randint(*p.context_blocks)
            new = [f"chat:u{user}:{len(past) + j}" for j in range(size)]
            weights = [SYSTEM] * len(system) + [0.5 + 0.5 * 0.6 ** (turn - k) for _, k in past]
            requests.append(_request(rng, t, system + [h for h, _ in past] + new, weights + [NEWEST] * size))
            past += [(h, turn) for h in new]
    return Trace(requests, block_bytes, p)


class Level(enum.Enum):
    CPU = "cpu"
    NVME = "nvme"


class Copies(enum.Enum):
    """What happens to a block's NVMe file when the block is promoted back to CPU RAM."""

    EXCLUSIVE = "exclusive"  # the file is deleted: each demotion writes the block again
    KEEP = "keep"  # the file stays (blocks are immutable), NVMe evicts in policy order
    # the file stays, and NVMe evicts copies of blocks that are also in CPU RAM first
    # (dropping them loses no hit now), each group in policy order
    KEEP_REDUNDANT_FIRST = "keep-redundant-first"


class Belady:
    """Belady's MIN with bypass: an offline reference that no real tier can run, as it reads
    the whole trace in advance. Benchmark-only (not a `tier.policy`).

    Scores a block -(index of the next request that reads it), never read again -inf, so a
    tier under pressure evicts the block read farthest in the future first, CPU RAM and NVMe
    alike (the store's mechanics are unchanged: watermarks, demotion writes, redundant NVMe
    copies dropped first). Admission (`admits`): when CPU RAM is at its low
    watermark, an NVMe hit is copied into it only if its next read comes before the farthest
    next read among the CPU residents at the request's start; otherwise it is served from NVMe
    (bypass), as MIN with the incoming block among the candidate victims would; an admitted
    block displaces that resident for the request's later NVMe hits. One instance
    serves both tiers; the store tells it which request is being served (`begin`).

    What it bounds: the reads served from NVMe. MIN with bypass minimises the misses of one
    cache of fixed size; here that cache is CPU RAM, a miss there an NVMe read or a
    recomputation. With NVMe holding every block (multi-round QA, --nvme-blocks 4000) every
    policy hits every stored block (equal hit rates) and bytes moved = NVMe reads + NVMe
    writes; a block is written once, the first time it leaves CPU RAM, so the writes are at
    least the trace's distinct blocks less the 90 % of CPU RAM that may hold some at the end.
    Belady's NVMe reads plus that write floor are then (up to the points below) a lower bound
    on any policy's bytes moved in this store, and belady's own bytes exceed it only by its
    writes above the floor. What it does not bound:
    - writes. Every CPU victim without an NVMe copy is written, as under every policy, also a
      block never read again (`bytes_demoted_dead`: what an oracle allowed to discard those
      would save on top); and MIN picks victims by next read only, not preferring a block that
      already has an NVMe copy (free to evict) over one that needs a write. A write-aware
      optimum could trade a later read for a write now, so its bytes may be lower still.
    - the watermarks: CPU RAM evicts in batches (from 90 % down to 80 %), not one block per
      miss, and admission sees the residents as of the request's start and not the blocks it
      recomputes, so this is MIN's rule under the store's mechanics, not a proof.
    - hit rate where tiers drop blocks (NVMe under pressure, as on the replay): the engine
      reuses the leading run of a chain only, and MIN counts a read behind a missing block (a
      hole, recomputed anyway) as a use, so keeping such a block can be wasted.
    """

    name = BELADY
    threshold = None  # no periodic demotion: evicts under pressure only
    params = None

    def __init__(self, requests: list[Request]) -> None:
        self._requests = requests
        self._reads: dict[str, list[int]] = defaultdict(list)  # block -> indices of the requests reading it
        for i, request in enumerate(requests):
            for h in request.blocks:
                self._reads[h].append(i)
        self.request = -1  # index of the request being served (after its cleanup)

    def begin(self, request: Request) -> None:
        """The store starts serving `request`: the trace's next one."""
        i = self.request + 1
        if i >= len(self._requests) or self._requests[i] is not request:
            raise ValueError(f"Belady: expected request {i} of its trace, got another")
        self.request = i

    def next_read(self, block_hash: str) -> float:
        """Index of the first request after the current one that reads the block; inf if none."""
        reads = self._reads.get(block_hash, [])
        k = bisect_right(reads, self.request)
        return reads[k] if k < len(reads) else float("inf")

    def score(self, stats: BlockStats) -> float:
        return -self.next_read(stats.block_hash)

    def touch(self, stats: BlockStats, at: float | None = None) -> None:
        stats.hits += 1
        stats.last_access = self._requests[self.request].time if at is None else at

    def tune(self, pressure: float) -> None:
        return None

    def promotion_bar(self, residents: Iterable[BlockStats]) -> None:
        """None: the store asks `admits`, over `residents_by_next_read`, instead."""
        return None

    def residents_by_next_read(self, residents: Iterable[BlockStats]) -> list[float]:
        """The next reads of `residents` (CPU RAM's, at the request's start) as a max-heap
        (negated), which `admits` updates as the request's NVMe hits come in."""
        heap = [-self.next_read(b.block_hash) for b in residents]
        heapq.heapify(heap)
        return heap

    def admits(self, heap: list[float] | None, stats: BlockStats) -> bool:
        """Whether an NVMe hit is copied into CPU RAM: always below the low watermark (`heap`
        None); else if it is read again before the farthest resident, which it then displaces
        in `heap` (the tier itself evicts after the request, `TwoLevelStore._make_room`)."""
        if not heap:
            return True
        read = self.next_read(stats.block_hash)
        if read >= -heap[0]:
            return False
        heapq.heapreplace(heap, -read)
        return True


class TwoLevelStore:
    """CPU and NVMe tiers under one policy (an instance per tier, one `BlockStats` per block,
    shared by its copies). Invariant (`check_integrity`): `used[level]` is the sum of the
    level's block sizes; a block in both tiers has one stats object; with `Copies.EXCLUSIVE`
    no block is in both. `policy`: a `tier.policy` name (an instance per tier), or a `Belady`
    oracle (one for both tiers, told each request as it starts)."""

    def __init__(
        self,
        policy: str | Belady,
        config: A2crConfig,
        capacity: dict[Level, int],
        cleanup: bool,
        copies: Copies = Copies.KEEP_REDUNDANT_FIRST,
    ) -> None:
        self.now = 0.0
        self.oracle = policy if isinstance(policy, Belady) else None
        self.policy: dict[Level, EvictionPolicy] = {
            lv: self.oracle or make_policy(policy, config, self.clock) for lv in Level
        }
        self.blocks: dict[Level, dict[str, BlockStats]] = {lv: {} for lv in Level}
        self.used = dict.fromkeys(Level, 0)
        self.capacity = capacity
        self.copies = copies
        self.cleanup_interval = config.cleanup_interval if cleanup else float("inf")
        self.next_cleanup = self.cleanup_interval
        self.count: Counter[str] = Counter()

    def clock(self) -> float:
        return self.now

    def serve(self, request: Request, block_bytes: int) -> None:
        self.now = request.time
        while self.now >= self.next_cleanup:
            self._cleanup()
            self.next_cleanup += self.cleanup_interval
        if self.oracle:
            self.oracle.begin(request)
        cpu, nvme = self.blocks[Level.CPU], self.blocks[Level.NVME]
        policy = self.policy[Level.CPU]
        # CPU at its low watermark or above: a promotion displaces a resident, if admitted
        full = self.used[Level.CPU] >= LOW_WATERMARK * self.capacity[Level.CPU]
        bar = policy.promotion_bar(cpu.values()) if full else None
        heap = self.oracle.residents_by_next_read(cpu.values()) if full and self.oracle else None
        leading = True  # the engine reuses the leading run of stored blocks only
        for position, (h, mass) in enumerate(zip(request.blocks, request.mass, strict=True)):
            kind = h.split(":", 1)[0]
            stats = cpu.get(h) or nvme.get(h)
            if stats is None:
                outcome, stats, leading = (
                    "miss",
                    BlockStats(BlockHash(h), block_bytes, self.now, self.now),
                    False,
                )
                self._add(Level.CPU, stats)
                self.count["bytes_recomputed"] += block_bytes
            elif not leading:  # stored behind a missing block: recomputed, and put again (an access)
                outcome = "hole"
                self.count["bytes_recomputed"] += block_bytes
            elif h in cpu:
                outcome = "cpu"
            else:
                outcome = "nvme"
                admitted = self.oracle.admits(heap, stats) if self.oracle else admits(bar, stats.hits)
                self._promote(stats, admitted)
            self.count[outcome] += 1
            self.count[f"{kind}:{outcome}"] += 1
            stats.position = position
            policy.touch(stats)
            observe_attention(stats, mass, len(request.blocks))
        self._make_room(Level.CPU)
        self._make_room(Level.NVME)

    def _add(self, level: Level, stats: BlockStats) -> None:
        self.blocks[level][stats.block_hash] = stats
        self.used[level] += stats.size_bytes

    def _remove(self, level: Level, stats: BlockStats) -> None:
        del self.blocks[level][stats.block_hash]
        self.used[level] -= stats.size_bytes

    def _promote(self, stats: BlockStats, admitted: bool = True) -> None:
        """NVMe -> CPU: one read; the NVMe file stays unless the tiers are exclusive. A block the
        policy does not admit (`promotion_bar`) is read and served from NVMe, not kept in CPU."""
        self.count["bytes_promoted"] += stats.size_bytes
        if not admitted:
            self.count["not_admitted"] += 1
            return
        if self.copies is Copies.EXCLUSIVE:
            self._remove(Level.NVME, stats)
        self._add(Level.CPU, stats)

    def _demote(self, victims: list[BlockStats]) -> None:
        """CPU -> NVMe: a write only for blocks without an NVMe copy."""
        for stats in victims:
            self._remove(Level.CPU, stats)
            if stats.block_hash not in self.blocks[Level.NVME]:
                self._add(Level.NVME, stats)
                self.count["bytes_demoted"] += stats.size_bytes
                if self.oracle and self.oracle.next_read(stats.block_hash) == float("inf"):
                    self.count["bytes_demoted_dead"] += stats.size_bytes  # never read again

    def _drop(self, victims: list[BlockStats]) -> None:
        for stats in victims:
            self._remove(Level.NVME, stats)
            self.count["bytes_dropped"] += stats.size_bytes

    def _make_room(self, level: Level) -> None:
        """Above the high watermark: frees down to the low one (`bytes_to_free`)."""
        need = bytes_to_free(self.used[level], self.capacity[level])
        if need <= 0:
            return
        if level is Level.CPU:
            self._demote(select_victims(self.policy[level], self.blocks[level].values(), need))
            return
        redundant = self.blocks[Level.CPU] if self.copies is Copies.KEEP_REDUNDANT_FIRST else {}
        self._drop(
            select_victims_redundant_first(self.policy[level], self.blocks[level].values(), need, redundant)
        )

    def _cleanup(self) -> None:
        """As services/tier/manager.py: tune each tier to its pressure now, demote CPU blocks
        below the threshold, then enforce the watermarks."""
        for level in Level:
            self.policy[level].tune(self.used[level] / self.capacity[level])
        victims = below_threshold(self.policy[Level.CPU], self.blocks[Level.CPU].values())
        self.count["threshold_demotions"] += len(victims)
        self._demote(victims)
        self._make_room(Level.CPU)
        self._make_room(Level.NVME)

    def check_integrity(self) -> None:
        cpu, nvme = self.blocks[Level.CPU], self.blocks[Level.NVME]
        both = cpu.keys() & nvme.keys()
        assert self.copies is not Copies.EXCLUSIVE or not both
        assert all(cpu[h] is nvme[h] for h in both)
        for level in Level:
            assert self.used[level] == sum(b.size_bytes for b in self.blocks[level].values())


def replay(
    policy_name: str,
    trace: Trace,
    cpu_capacity: int,
    nvme_capacity: int,
    *,
    config: A2crConfig | None = None,
    cleanup: bool = True,
    copies: Copies = Copies.KEEP_REDUNDANT_FIRST,
) -> dict[str, Any]:
    """Runs `trace` through a fresh store; capacities in bytes, hit rates in blocks.
    `policy_name`: a `tier.policy`, one of `VARIANTS` (A²CR with `config` so changed), or
    "belady" (`Belady`, the offline reference: its result adds `bytes_demoted_dead`)."""
    capacity = {Level.CPU: cpu_capacity, Level.NVME: nvme_capacity}
    config = config or A2crConfig()
    policy: str | Belady = policy_name
    if policy_name in VARIANTS:
        policy, config = "a2cr", dataclasses.replace(config, **VARIANTS[policy_name])
    elif policy_name == BELADY:
        policy = Belady(trace.requests)
    store = TwoLevelStore(policy, config, capacity, cleanup, copies)
    for request in trace.requests:
        store.serve(request, trace.block_bytes)
    store.check_integrity()
    c = store.count

    def rate(prefix: str, outcomes: tuple[str, ...] = ("cpu", "nvme")) -> float:
        n = sum(c[prefix + o] for o in ("cpu", "nvme", "hole", "miss"))
        return sum(c[prefix + o] for o in outcomes) / n if n else 0.0

    return {
        "policy": policy_name,
        "hit_rate": {
            "cpu": rate("", ("cpu",)),
            "nvme": rate("", ("nvme",)),
            "total": rate(""),
            "stored": rate("", ("cpu", "nvme", "hole")),
        },
        "hit_rate_by_class": {kind: rate(f"{kind}:") for kind in CLASSES},
        "bytes_moved": c["bytes_demoted"] + c["bytes_promoted"],
        **{k: c[k] for k in ("bytes_demoted", "bytes_promoted", "bytes_dropped", "bytes_recomputed")},
        "threshold_demotions": c["threshold_demotions"],
        "not_admitted": c["not_admitted"],
        **({"bytes_demoted_dead": c["bytes_demoted_dead"]} if store.oracle else {}),
    }


WORKLOADS = ("replay", "multiround")


def workload_trace(workload: str, seed: int, duration_s: float = 3600.0) -> Trace:
    """The documented trace of `workload` ("replay": `make_trace`; "multiround":
    `make_multiround_trace`) with its defaults but `seed` (and the replay's `duration_s`)."""
    if workload == "replay":
        return make_trace(TraceParams(seed=seed, duration_s=duration_s))
    if workload == "multiround":
        return make_multiround_trace(MultiRoundParams(seed=seed))
    raise ValueError(f"workload: expected one of {', '.join(WORKLOADS)}, got {workload!r}")


def replay_all(
    cpu_blocks: int,
    nvme_blocks: int,
    seed: int,
    *,
    workload: str = "replay",
    duration_s: float = 3600.0,
    cleanup: bool = True,
    copies: Copies = Copies.KEEP_REDUNDANT_FIRST,
    policies: tuple[str, ...] = POLICIES,
) -> dict[str, Any]:
    """The documented trace of `workload` (`workload_trace`) through every policy.

    Returns {"hit_rate": {policy: total block hit rate}, "bytes_moved": {policy: bytes},
    "params": the trace and store settings, "details": {policy: `replay`'s dict}}.
    About 3 s per seed at the default sizes (500 / 4000 blocks).
    """
    trace = workload_trace(workload, seed, duration_s)
    cpu, nvme = cpu_blocks * trace.block_bytes, nvme_blocks * trace.block_bytes
    details = {name: replay(name, trace, cpu, nvme, cleanup=cleanup, copies=copies) for name in policies}
    params = {
        "workload": workload,
        **dataclasses.asdict(trace.params),
        "cpu_blocks": cpu_blocks,
        "nvme_blocks": nvme_blocks,
        "block_bytes": trace.block_bytes,
        "cleanup": cleanup,
        "copies": copies.value,
        "requests": len(trace.requests),
        "block_accesses": sum(len(r.blocks) for r in trace.requests),
        "ideal_hit_rate": ideal_hit_rate(trace),
    }
    return {
        "hit_rate": {n: r["hit_rate"]["total"] for n, r in details.items()},
        "bytes_moved": {n: r["bytes_moved"] for n, r in details.items()},
        "params": params,
        "details": details,
    }


def ideal_hit_rate(trace: Trace) -> float:
    """Unbounded capacity: only first accesses miss."""
    unique = len({h for r in trace.requests for h in r.blocks})
    return 1.0 - unique / sum(len(r.blocks) for r in trace.requests)


COLUMNS = ("total", "cpu", "nvme", "sys", "doc", "chat", "MiB moved", "demoted", "promoted")


def row(r: dict[str, Any]) -> list[float]:
    """One policy's `replay` result as the table's columns (rates, then MiB)."""
    rates = [r["hit_rate"][k] for k in COLUMNS[:3]] + [r["hit_rate_by_class"][k] for k in COLUMNS[3:6]]
    return rates + [r[k] / (1 << 20) for k in ("bytes_moved", "bytes_demoted", "bytes_promoted")]


def median_rows(runs: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per policy, the median of each column over `replay_all` results (one per seed)."""
    policies = runs[0]["details"].keys()
    return {
        name: [
            statistics.median(col) for col in zip(*(row(run["details"][name]) for run in runs), strict=True)
        ]
        for name in policies
    }


def print_table(rows: dict[str, list[float]]) -> None:
    width = max(8, *(len(name) + 1 for name in rows))
    print(f"{'policy':<{width}}" + "".join(f"{h:>10}" for h in COLUMNS))
    for name, values in rows.items():
        print(
            f"{name:<{width}}"
            + "".join(f"{v:>10.3f}" for v in values[:6])
            + "".join(f"{v:>10.0f}" for v in values[6:])
        )


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main() -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--workload", choices=WORKLOADS, default="replay")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--cpu-blocks", type=_ints, default=[500], help="one or a comma list (a sweep)")
    parser.add_argument("--nvme-blocks", type=_ints, default=[4000], help="one or a comma list (a sweep)")
    parser.add_argument("--seeds", type=_ints, default=[0], help="comma list; tables show medians")
    parser.add_argument("--duration", type=float, default=3600.0, help="seconds of trace time")
    parser.add_argument("--no-cleanup", action="store_true", help="no periodic threshold demotion")
    parser.add_argument(
        "--copies", choices=[c.value for c in Copies], default=Copies.KEEP_REDUNDANT_FIRST.value
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    out: list[dict[str, Any]] = []
    for cpu_blocks, nvme_blocks in itertools.product(args.cpu_blocks, args.nvme_blocks):
        runs = [
            replay_all(
                cpu_blocks,
                nvme_blocks,
                seed,
                workload=args.workload,
                duration_s=args.duration,
                cleanup=not args.no_cleanup,
                copies=Copies(args.copies),
                policies=tuple(args.policies.split(",")),
            )
            for seed in args.seeds
        ]
        p = runs[0]["params"]
        ideal = statistics.median(run["params"]["ideal_hit_rate"] for run in runs)
        print(f"\n{args.workload}: cpu_blocks {cpu_blocks}, nvme_blocks {nvme_blocks}, copies {args.copies}")
        print(
            f"seeds {args.seeds}; seed {args.seeds[0]}: {p['requests']} requests, {p['block_accesses']} reads"
        )
        print(f"median block hit rates (unbounded capacity: {ideal:.3f}), MiB between tiers")
        rows = median_rows(runs)
        print_table(rows)
        if "a2cr" in rows and "lru" in rows:
            margins = [run["hit_rate"]["a2cr"] - run["hit_rate"]["lru"] for run in runs]
            print("a2cr - lru total hit rate per seed: " + ", ".join(f"{m:+.4f}" for m in margins))
        for name in (n for n in rows if n != "lru" and "lru" in rows):
            per_seed = [
                f"{run['hit_rate'][name] - run['hit_rate']['lru']:+.4f} / "
                f"{run['bytes_moved'][name] / run['bytes_moved']['lru'] - 1:+.1%}"
                for run in runs
            ]
            print(f"{name} - lru per seed (hit rate / bytes moved): " + ", ".join(per_seed))
        summary = {
            key: {n: v[i] for n, v in rows.items()} for i, key in ((0, "hit_rate"), (6, "bytes_moved"))
        }
        summary["bytes_moved"] = {n: v * (1 << 20) for n, v in summary["bytes_moved"].items()}
        out.append({"policy": summary, "params": {**p, "seeds": args.seeds}, "runs": runs})
    write_json(args.json, out[0] if len(out) == 1 else {"sweep": out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
