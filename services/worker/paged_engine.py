"""The paged, continuously batched engine (behind the `Engine` interface).

    add_request ─▶ BatchScheduler.waiting ─▶ schedule() ─▶ ModelRunner.run() ─▶ sample
                         ▲   (prefix cache, chunked prefill, preemption)        │
                         └──────────────── abort / finish release blocks ◀──────┘

Per step: the scheduler picks sequences and token counts within the budget,
the runner computes them in one packed forward pass (writing their K/V into the
pool), full blocks get their chain hash and enter the prefix cache, and every
sequence that reached the end of its known tokens samples one token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from wicore.errors import Overloaded
from wicore.hashing import BlockHash, chain_hashes, root_hash
from wicore.worker.batch_scheduler import BatchScheduler, ScheduledSeq
from wicore.worker.block_pool import BlockPool
from wicore.worker.engine_types import EngineRequest, EngineStats, FinishReason, StepOutput
from wicore.worker.model_runner import ModelRunner
from wicore.worker.sampler import make_generator, sample_batch, token_logprobs
from wicore.worker.sequence import Sequence


@dataclass(frozen=True, slots=True)
class EngineConfig:
    num_blocks: int
    block_size: int = 16
    max_running: int = 64
    max_num_batched_tokens: int = 1024

    def __post_init__(self) -> None:
        if min(self.num_blocks, self.block_size, self.max_running, self.max_num_batched_tokens) < 1:
            raise ValueError(f"every engine setting must be positive: {self}")


class PagedEngine:
    def __init__(self, model: Any, config: EngineConfig, model_fingerprint: str) -> None:
        self.config = config
        self.runner = ModelRunner(model, config.num_blocks, config.block_size)
        self.pool = BlockPool(config.num_blocks, config.block_size)
        self.scheduler = BatchScheduler(
            self.pool, config.max_running, config.max_num_batched_tokens, self._prefix_hashes
        )
        self.fingerprint = model_fingerprint
        self.seqs: dict[str, Sequence] = {}
        self._arrivals = 0
        self.num_preemptions = 0

    @property
    def max_sequence_tokens(self) -> int:
        """The longest sequence (prompt + new tokens) the pool can ever hold."""
        return self.config.num_blocks * self.config.block_size

    def add_request(self, request: EngineRequest) -> None:
        if request.request_id in self.seqs:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        total = len(request.prompt_token_ids) + request.max_new_tokens
        if total > self.max_sequence_tokens:
            raise Overloaded(
                f"max_tokens: the prompt plus max_tokens ({total} tokens) exceeds this worker's "
                f"KV cache of {self.max_sequence_tokens} tokens"
            )
        self._arrivals += 1
        seq = Sequence(request, make_generator(request.sampling.seed), arrival=self._arrivals)
        self.seqs[request.request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        seq = self.seqs.pop(request_id, None)
        if seq is not None:
            self.scheduler.remove(seq)

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            free_blocks=self.pool.num_free,
            total_blocks=self.pool.num_blocks,
            block_size=self.pool.block_size,
        )

    def step(self) -> list[StepOutput]:
        batch = self.scheduler.schedule()
        self.num_preemptions += len(self.scheduler.preempted)
        if not batch:
            return []
        sampling = [item for item in batch if item.samples]
        logits = self.runner.run(batch)
        for item in batch:
            item.seq.num_computed += item.num_tokens
            self._register_full_blocks(item.seq)
        return self._sample(logits, sampling)

    def _sample(self, logits: Any, sampling: list[ScheduledSeq]) -> list[StepOutput]:
        seqs = [item.seq for item in sampling]
        tokens = sample_batch(
            logits,
            [s.request.sampling for s in seqs],
            [s.generator for s in seqs],
            [s.token_ids if s.request.sampling.repetition_penalty != 1.0 else () for s in seqs],
        )
        logprobs = token_logprobs(logits, tokens, [s.request.logprobs for s in seqs])
        outputs = []
        for seq, token, lp in zip(seqs, tokens, logprobs, strict=True):
            seq.token_ids.append(token)
            reason = self._finish_reason(seq, token)
            outputs.append(
                StepOutput(seq.request_id, [token], reason, seq.cached_tokens, [lp] if lp is not None else [])
            )
            if reason is not None:
                self.abort_request(seq.request_id)
        return outputs

    @staticmethod
    def _finish_reason(seq: Sequence, token: int) -> FinishReason | None:
        if token in seq.request.stop_token_ids:
            return FinishReason.STOP
        if len(seq.token_ids) - seq.num_prompt >= seq.request.max_new_tokens:
            return FinishReason.LENGTH
        return None

    def _root(self, seq: Sequence) -> bytes:
        return root_hash(self.fingerprint, seq.request.cache_salt)

    def _prefix_hashes(self, seq: Sequence) -> list[BlockHash]:
        """Hashes of the blocks a new admission may take from the cache: every full
        block but the one holding the last token (at least one token must be computed)."""
        bs = self.config.block_size
        usable = (len(seq.token_ids) - 1) // bs
        return chain_hashes(self._root(seq), seq.token_ids[: usable * bs], bs)

    def _register_full_blocks(self, seq: Sequence) -> None:
        bs = self.config.block_size
        full = seq.num_computed // bs
        done = len(seq.block_hashes)
        if full <= done:
            return
        prev = bytes.fromhex(seq.block_hashes[-1]) if done else self._root(seq)
        new = chain_hashes(prev, seq.token_ids[done * bs : full * bs], bs)
        for block_id, h in zip(seq.block_ids[done:full], new, strict=True):
            self.pool.register(block_id, h)
        seq.block_hashes += new
