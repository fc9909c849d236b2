"""Replays one seeded multi-tenant trace through a two-level KV store (CPU RAM, NVMe)
under A²CR, LRU and LFU, and compares hit rates and bytes moved between the tiers.

    python benchmark/policy_replay.py [--cpu-blocks 500 --nvme-blocks 4000 --seed 0] --json OUT

The trace (`make_trace`), a request being the chain of block hashes of its sequence:
- tenants (Zipf popularity) each have a system prompt that prefixes all their chat
  and document requests: hot, and attended strongly;
- documents: per-tenant corpus, Zipf popularity, 32-160 blocks, asked about now and
  then (system prompt + document + one question block);
- chat sessions: Poisson arrivals, ~6 turns; each turn re-reads system prompt + the
  whole history and appends 2-5 blocks (user message, reply); 80 % of the gaps
  are short (mean 30 s), 20 % the user comes back later (mean 15 min);
- one-off prompts: 1-8 unique blocks, 70 % behind their tenant's system prompt.
Attention assumptions (share of a request's decode attention mass per block): the
first block of a sequence is an attention sink (weight 8), other system-prompt
blocks 2, the newest turn / question 1.5, chat history 0.5 + 0.5·0.6^turns_back,
document blocks 1 near the ends and 0.6 in the middle ("lost in the middle"), one-off
blocks 1; times log-normal noise (sigma 0.4), normalised per request.

The store (`replay`), one policy instance per tier, the trace's time as the clock:

    request: h0 h1 ... hn   CPU hit -> counted; NVMe hit -> promoted to CPU;
                            miss -> recomputed, written to CPU; then touch + observe
    after each request      CPU  >= 90 % -> lowest scores demoted to NVMe down to 80 %
                            NVMe >= 90 % -> lowest scores dropped down to 80 %
    every cleanup_interval  tune(pressure) per tier; CPU blocks below the threshold
                            demoted to NVMe (A²CR only: LRU/LFU have no threshold)

Hit rates count blocks; bytes moved = demoted + promoted. A block that leaves both
tiers loses its statistics (no ghost entries), for every policy alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wicore.config import A2crConfig
from wicore.hashing import BlockHash
from wicore.tier.policy import (
    BlockStats,
    EvictionPolicy,
    below_threshold,
    bytes_to_free,
    make_policy,
    observe_attention,
    select_victims,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json

# One 16-token block of SmolLM2-135M in fp16: 30 layers x (K, V) x 3 KV heads x 64 x 16 x 2 bytes.
BLOCK_BYTES = 30 * 2 * 3 * 64 * 16 * 2
SINK, SYSTEM, NEWEST, DOC_EDGE, DOC_MIDDLE, ONE_OFF = 8.0, 2.0, 1.5, 1.0, 0.6, 1.0
CLASSES = ("sys", "doc", "chat", "oneoff")


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
    params: TraceParams


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


class Level(enum.Enum):
    CPU = "cpu"
    NVME = "nvme"


class TwoLevelStore:
    """CPU and NVMe tiers of one policy. Invariant: a block is in at most one tier and
    `used[level]` is the sum of its blocks' sizes (`check_integrity`)."""

    def __init__(self, policy: str, config: A2crConfig, capacity: dict[Level, int], cleanup: bool) -> None:
        self.now = 0.0
        self.policy: dict[Level, EvictionPolicy] = {
            lv: make_policy(policy, config, self.clock) for lv in Level
        }
        self.blocks: dict[Level, dict[str, BlockStats]] = {lv: {} for lv in Level}
        self.used = dict.fromkeys(Level, 0)
        self.capacity = capacity
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
        cpu, nvme = self.blocks[Level.CPU], self.blocks[Level.NVME]
        for h, mass in zip(request.blocks, request.mass, strict=True):
            kind = h.split(":", 1)[0]
            if h in cpu:
                outcome = "cpu"
            elif h in nvme:
                outcome = "nvme"
                self._move(nvme[h], Level.NVME, Level.CPU, "bytes_promoted")
            else:
                outcome = "miss"
                self._add(Level.CPU, BlockStats(BlockHash(h), block_bytes, self.now, self.now))
                self.count["bytes_recomputed"] += block_bytes
            self.count[outcome] += 1
            self.count[f"{kind}:{outcome}"] += 1
            stats = cpu[h]
            self.policy[Level.CPU].touch(stats)
            observe_attention(stats, mass, len(request.blocks))
        self._enforce(Level.CPU)
        self._enforce(Level.NVME)

    def _add(self, level: Level, stats: BlockStats) -> None:
        self.blocks[level][stats.block_hash] = stats
        self.used[level] += stats.size_bytes

    def _remove(self, level: Level, stats: BlockStats) -> None:
        del self.blocks[level][stats.block_hash]
        self.used[level] -= stats.size_bytes

    def _move(self, stats: BlockStats, src: Level, dst: Level, counter: str) -> None:
        self._remove(src, stats)
        self._add(dst, stats)
        self.count[counter] += stats.size_bytes

    def _demote(self, level: Level, victims: list[BlockStats]) -> None:
        for stats in victims:
            if level is Level.CPU:
                self._move(stats, Level.CPU, Level.NVME, "bytes_demoted")
            else:
                self._remove(Level.NVME, stats)
                self.count["bytes_dropped"] += stats.size_bytes

    def _enforce(self, level: Level) -> None:
        used, capacity = self.used[level], self.capacity[level]
        self.policy[level].tune(used / capacity)
        victims = select_victims(
            self.policy[level], self.blocks[level].values(), bytes_to_free(used, capacity)
        )
        self._demote(level, victims)

    def _cleanup(self) -> None:
        for level in Level:
            self.policy[level].tune(self.used[level] / self.capacity[level])
        self._demote(Level.CPU, below_threshold(self.policy[Level.CPU], self.blocks[Level.CPU].values()))
        self._enforce(Level.NVME)

    def check_integrity(self) -> None:
        assert not self.blocks[Level.CPU].keys() & self.blocks[Level.NVME].keys()
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
) -> dict[str, Any]:
    """Runs `trace` through a fresh store; capacities in bytes, hit rates in blocks."""
    capacity = {Level.CPU: cpu_capacity, Level.NVME: nvme_capacity}
    store = TwoLevelStore(policy_name, config or A2crConfig(), capacity, cleanup)
    for request in trace.requests:
        store.serve(request, trace.block_bytes)
    store.check_integrity()
    c = store.count

    def rate(prefix: str, outcomes: tuple[str, ...] = ("cpu", "nvme")) -> float:
        n = sum(c[prefix + o] for o in ("cpu", "nvme", "miss"))
        return sum(c[prefix + o] for o in outcomes) / n if n else 0.0

    return {
        "policy": policy_name,
        "hit_rate": {"cpu": rate("", ("cpu",)), "nvme": rate("", ("nvme",)), "total": rate("")},
        "hit_rate_by_class": {kind: rate(f"{kind}:") for kind in CLASSES},
        "bytes_moved": c["bytes_demoted"] + c["bytes_promoted"],
        **{k: c[k] for k in ("bytes_demoted", "bytes_promoted", "bytes_dropped", "bytes_recomputed")},
    }


def ideal_hit_rate(trace: Trace) -> float:
    """Unbounded capacity: only first accesses miss."""
    unique = len({h for r in trace.requests for h in r.blocks})
    return 1.0 - unique / sum(len(r.blocks) for r in trace.requests)


def print_table(results: dict[str, dict[str, Any]]) -> None:
    columns = ("total", "cpu", "nvme", "sys", "doc", "chat", "MiB moved", "demoted", "promoted")
    print(f"{'policy':<8}" + "".join(f"{h:>10}" for h in columns))
    for name, r in results.items():
        rates = [r["hit_rate"][k] for k in columns[:3]] + [r["hit_rate_by_class"][k] for k in columns[3:6]]
        mib = [r[k] / (1 << 20) for k in ("bytes_moved", "bytes_demoted", "bytes_promoted")]
        print(f"{name:<8}" + "".join(f"{v:>10.3f}" for v in rates) + "".join(f"{v:>10.0f}" for v in mib))


def main() -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--policies", default="a2cr,lru,lfu")
    parser.add_argument("--cpu-blocks", type=int, default=500)
    parser.add_argument("--nvme-blocks", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--duration", type=float, default=3600.0, help="seconds of trace time")
    parser.add_argument("--no-cleanup", action="store_true", help="no periodic threshold demotion")
    parser.add_argument("--json")
    args = parser.parse_args()
    trace = make_trace(TraceParams(seed=args.seed, duration_s=args.duration))
    cpu, nvme = args.cpu_blocks * trace.block_bytes, args.nvme_blocks * trace.block_bytes
    policies = args.policies.split(",")
    results = {name: replay(name, trace, cpu, nvme, cleanup=not args.no_cleanup) for name in policies}
    params = {
        **dataclasses.asdict(trace.params),
        **{k: getattr(args, k) for k in ("cpu_blocks", "nvme_blocks")},
        "block_bytes": trace.block_bytes,
        "cleanup": not args.no_cleanup,
        "requests": len(trace.requests),
        "block_accesses": sum(len(r.blocks) for r in trace.requests),
        "ideal_hit_rate": ideal_hit_rate(trace),
    }
    print(", ".join(f"{k} {params[k]}" for k in ("requests", "block_accesses", "cpu_blocks", "nvme_blocks")))
    print(f"block hit rates (unbounded capacity: {params['ideal_hit_rate']:.3f}), MiB between tiers")
    print_table(results)
    summary = {
        "hit_rate": {n: r["hit_rate"]["total"] for n, r in results.items()},
        "bytes_moved": {n: r["bytes_moved"] for n, r in results.items()},
    }
    write_json(args.json, {"policy": summary, "params": params, "details": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
