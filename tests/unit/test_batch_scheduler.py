"""BatchScheduler on a constructed pool: budgets, chunking, admission, preemption order."""

from __future__ import annotations

import torch

from wicore.kv.hashing import BlockHash, chain_hashes, root_hash
from wicore.worker.batch_scheduler import BatchScheduler
from wicore.worker.block_pool import BlockPool
from wicore.worker.engine_types import EngineRequest
from wicore.worker.sequence import SeqStatus, Sequence

ROOT = root_hash("test-model")


def prefix_hashes(seq: Sequence) -> list[BlockHash]:
    usable = (len(seq.token_ids) - 1) // 4
    return chain_hashes(ROOT, seq.token_ids[: usable * 4], 4)


def make(num_blocks: int = 8, budget: int = 16, max_running: int = 8) -> BatchScheduler:
    return BatchScheduler(BlockPool(num_blocks, 4), max_running, budget, prefix_hashes)


def seq(n_prompt: int, arrival: int, max_new: int = 4, first: int = 0) -> Sequence:
    request = EngineRequest(f"r{arrival}", list(range(first, first + n_prompt)), max_new)
    return Sequence(request, torch.Generator(), arrival=arrival)


def advance(sched: BatchScheduler) -> list[tuple[str, int]]:
    """One step as the engine does it (full blocks enter the prefix cache, sampling
    appends a fixed token); returns (request id, tokens computed) per sequence."""
    batch = sched.schedule()
    for item in batch:
        samples = item.samples
        s = item.seq
        s.num_computed += item.num_tokens
        full = s.num_computed // 4
        hashes = chain_hashes(ROOT, s.token_ids[: full * 4], 4)
        for block_id, h in zip(
            s.block_ids[len(s.block_hashes) : full], hashes[len(s.block_hashes) :], strict=True
        ):
            sched.pool.register(block_id, h)
        s.block_hashes = hashes
        if samples:
            s.token_ids.append(7)
    sched.pool.check_integrity()
    return [(item.seq.request_id, item.num_tokens) for item in batch]


def test_long_prompts_are_chunked_under_the_token_budget() -> None:
    sched = make(budget=8)
    a, b = seq(10, 1), seq(3, 2)
    sched.add(a)
    sched.add(b)
    assert advance(sched) == [("r1", 8)]  # a's first chunk fills the budget
    assert advance(sched) == [("r1", 2), ("r2", 3)]  # a finishes its prompt, b joins
    assert advance(sched) == [("r1", 1), ("r2", 1)]  # both decode
    assert a.block_ids == [0, 1, 2] and b.block_ids == [3]


def test_admission_stops_at_max_running() -> None:
    sched = make(max_running=2)
    for i in range(1, 4):
        sched.add(seq(2, i))
    assert advance(sched) == [("r1", 2), ("r2", 2)]
    assert [s.request_id for s in sched.waiting] == ["r3"]


def test_the_latest_arrival_is_preempted_when_blocks_run_out() -> None:
    sched = make(num_blocks=4, budget=32)
    a, b = seq(8, 1, first=0), seq(7, 2, first=100)  # a: 2 blocks, b: 2 blocks (last partial)
    sched.add(a)
    sched.add(b)
    advance(sched)  # a: 9 tokens, b: 8 tokens; the pool is full
    assert sched.pool.num_free == 0
    assert advance(sched) == [("r1", 1)]  # a needs a 3rd block: b (later) is preempted
    assert [s.request_id for s in sched.preempted] == ["r2"]
    assert b.status is SeqStatus.WAITING and b.num_computed == 0 and b.block_ids == []
    assert sched.waiting[0] is b
    sched.remove(a)  # a finishes; b resumes from its one cached full block
    assert advance(sched) == [("r2", 4)]
    assert b.num_computed == 8 and b.cached_tokens == 0  # cached_tokens counts the first admission only
    assert b.num_preemptions == 1


def test_a_new_request_reuses_the_cached_prefix() -> None:
    sched = make(num_blocks=8)
    a = seq(9, 1)
    sched.add(a)
    advance(sched)
    shared = a.block_ids[:2]
    sched.remove(a)
    b = seq(10, 2)  # same first 8 tokens
    sched.add(b)
    assert advance(sched) == [("r2", 2)]
    assert b.cached_tokens == 8 and b.block_ids[:2] == shared
