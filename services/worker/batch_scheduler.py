"""Which sequences run in the next step, and how many tokens each.

Each step has a token budget (`max_num_batched_tokens`). Running sequences go
first, in admission order: a decoding sequence takes 1 token, a sequence still
in its prompt takes the next chunk that fits (chunked prefill). When a running
sequence needs a block and none is left, the most recently admitted running
sequence is preempted (its KV dropped, its full blocks left in the prefix cache)
until the block fits. Then waiting sequences are admitted in order, each first
reusing the longest prefix in the device cache, while budget, batch size and blocks
allow. Last, decoding sequences with speculative proposals also compute them, in
admission order, with the budget and blocks left: speculation never preempts or
delays another sequence. (Like any allocation, a proposal's block may reclaim a cached
prefix block when no free one is left; it returns to the free list after the step and
is reused there, so that happens about once per speculating sequence.) A sequence that
could never fit the pool is refused when added, so the oldest running sequence
can always finish: no deadlock, no crash.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from wicore.kv.hashing import BlockHash
from wicore.worker.block_pool import BlockPool
from wicore.worker.sequence import SeqStatus, Sequence


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # positions to compute this step, from seq.num_computed (proposals included)
    proposed: tuple[int, ...] = ()  # speculative tokens after the known ones (the last positions)

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the sequence's known tokens (then it samples)."""
        return self.seq.num_computed + self.num_tokens - len(self.proposed) == len(self.seq.token_ids)


class BatchScheduler:
    def __init__(
        self,
        pool: BlockPool,
        max_running: int,
        max_num_batched_tokens: int,
        prefix_hashes: Callable[[Sequence], list[BlockHash]],
    ) -> None:
        self.pool = pool
        self.max_running = max_running
        self.budget = max_num_batched_tokens
        self.prefix_hashes = prefix_hashes
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.preempted: list[Sequence] = []  # preempted during the last schedule(), for stats and tests
        self.prefix_queries = 0  # prompt tokens of first admissions (vLLM's prefix cache queries)
        self.prefix_hits = 0  # of those, the tokens found in the prefix cache

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Takes a sequence out wherever it is and releases its blocks."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._free(seq)

    def _free(self, seq: Sequence) -> None:
        self.pool.release(seq.block_ids)
        seq.block_ids = []
        seq.block_hashes = []
        seq.num_computed = 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.preempted.append(seq)

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Gives seq enough blocks for num_tokens tokens, preempting later arrivals if needed."""
        need = seq.blocks_needed(num_tokens, self.pool.block_size)
        while need > self.pool.num_free:
            victims = [s for s in self.running if s is not seq and s.arrival > seq.arrival]
            if not victims:
                return False
            self._preempt(max(victims, key=lambda s: s.arrival))
        seq.block_ids += self.pool.allocate(need)
        return True

    def schedule(self, proposals: Mapping[str, list[int]] | None = None) -> list[ScheduledSeq]:
        """The step's sequences; `proposals`: speculative tokens of decoding sequences, by request id."""
        self.preempted = []
        budget = self.budget
        scheduled: list[ScheduledSeq] = []
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted by an earlier sequence this step
                continue
            n = min(seq.num_uncomputed, budget)
            if not self._grow(seq, seq.num_computed + n):
                self._preempt(seq)
                continue
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        if not self.preempted:
            budget = self._admit(budget, scheduled)
        if proposals:
            self._add_proposals(scheduled, proposals, budget)
        return scheduled

    def _add_proposals(
        self, scheduled: list[ScheduledSeq], proposals: Mapping[str, list[int]], budget: int
    ) -> None:
        for i, item in enumerate(scheduled):
            if budget == 0:
                return
            proposed = self._room_for(
                item.seq, item.num_tokens, proposals.get(item.seq.request_id, ()), budget
            )
            if proposed:
                scheduled[i] = ScheduledSeq(item.seq, item.num_tokens + len(proposed), proposed)
                budget -= len(proposed)

    def _room_for(self, seq: Sequence, n: int, proposed: Seq[int], budget: int) -> tuple[int, ...]:
        """The proposals seq computes after its n known tokens: none unless the step ends its known
        tokens and the blocks left hold them (as many as the budget allows)."""
        proposed = proposed[: max(budget, 0)]
        if not proposed or n != seq.num_uncomputed:
            return ()
        need = seq.blocks_needed(seq.num_computed + n + len(proposed), self.pool.block_size)
        if need > self.pool.num_free:
            return ()
        seq.block_ids += self.pool.allocate(need)
        return tuple(proposed)

    def trim(self, seq: Sequence) -> None:
        """Releases seq's blocks past its computed tokens (held for rejected proposals): a running
        sequence holds exactly the blocks of its computed tokens between steps, as without them."""
        keep = -(-seq.num_computed // self.pool.block_size)
        if len(seq.block_ids) > keep:
            self.pool.release(seq.block_ids[keep:])
            del seq.block_ids[keep:]

    def _admit(self, budget: int, scheduled: list[ScheduledSeq]) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting[0]
            hashes = self.prefix_hashes(seq)
            cached = self.pool.longest_cached_prefix(hashes)
            seq.block_ids = cached
            seq.block_hashes = hashes[: len(cached)]
            seq.num_computed = len(cached) * self.pool.block_size
            n = min(seq.num_uncomputed, budget)
            need = seq.blocks_needed(seq.num_computed + n, self.pool.block_size)
            if need > self.pool.num_free:
                self._free(seq)
                break
            seq.block_ids += self.pool.allocate(need)
            if not seq.admitted_once:
                seq.cached_tokens = seq.num_computed
                seq.admitted_once = True
                self.prefix_queries += seq.num_prompt
                self.prefix_hits += min(seq.num_computed, seq.num_prompt)
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return budget
