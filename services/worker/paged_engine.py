"""The paged, continuously batched engine (behind the `Engine` interface).

    add_request ─▶ BatchScheduler.waiting ─▶ schedule() ─▶ ModelRunner.run() ─▶ sample
                         ▲   (prefix cache, chunked prefill, preemption)        │
                         └──────────────── abort / finish release blocks ◀──────┘

Per step: the scheduler picks sequences and token counts within the budget,
the runner computes them in one packed forward pass (writing their K/V into the
pool), and every sequence that reached the end of its known tokens samples one
token. With a `Speculator`, decoding sequences first get proposals, computed in
the same pass; verification keeps the accepted ones and adds one sampled token
(speculative.py). Then full blocks get their chain hash and enter the prefix cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from wicore.config import AttentionBackend, ModelImpl
from wicore.errors import Overloaded
from wicore.kv.attention import Observation
from wicore.kv.hashing import BlockHash, extend_chain, reusable_blocks, root_hash
from wicore.worker.batch_scheduler import BatchScheduler, ScheduledSeq
from wicore.worker.block_pool import BlockPool, Reclaimed
from wicore.worker.costs import CostMeter
from wicore.worker.engine_types import EngineRequest, EngineStats, FinishReason, StepOutput
from wicore.worker.kv_io import Spilled, read_blocks, write_blocks
from wicore.worker.model_runner import ModelRunner
from wicore.worker.sampler import make_generator, token_logprobs, verify
from wicore.worker.sequence import Sequence
from wicore.worker.speculative import Speculator


@dataclass(frozen=True, slots=True)
class EngineConfig:
    num_blocks: int
    block_size: int = 16
    max_running: int = 64
    max_num_batched_tokens: int = 1024
    attention_sample_every: int = 8  # measure attention (A²CR) every n-th step; 0: never
    attention_backend: AttentionBackend = AttentionBackend.AUTO
    model_impl: ModelImpl = ModelImpl.AUTO
    kernel_dir: str | None = None  # where native kernels are built (None: ~/.cache/wicore/kernels)

    def __post_init__(self) -> None:
        if min(self.num_blocks, self.block_size, self.max_running, self.max_num_batched_tokens) < 1:
            raise ValueError(f"every engine setting must be positive: {self}")
        if self.attention_sample_every < 0:
            raise ValueError(f"attention_sample_every must be >= 0, got {self.attention_sample_every}")


class PagedEngine:
    def __init__(
        self,
        model: Any,
        config: EngineConfig,
        model_fingerprint: str,
        speculator: Speculator | None = None,
    ) -> None:
        self.config = config
        self.speculator = speculator
        self.runner = ModelRunner(
            model,
            config.num_blocks,
            config.block_size,
            config.attention_backend,
            config.model_impl,
            config.kernel_dir,
        )
        self.pool = BlockPool(config.num_blocks, config.block_size)
        self.scheduler = BatchScheduler(
            self.pool, config.max_running, config.max_num_batched_tokens, self._prefix_hashes
        )
        self.fingerprint = model_fingerprint
        self.seqs: dict[str, Sequence] = {}
        self._arrivals = 0
        self.num_preemptions = 0
        self.num_steps = 0
        self.costs = CostMeter()  # measured prefill speed (and, with offload, tier load times)
        self._observe: Callable[[list[Observation]], None] | None = None

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
        seq.times.arrived = time.time()
        self.seqs[request.request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        seq = self.seqs.pop(request_id, None)
        if seq is not None:
            self.scheduler.remove(seq)
            if self.speculator is not None:
                self.speculator.forget(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    def resident_hashes(self) -> frozenset[BlockHash]:
        return self.pool.hashes()

    def stats(self) -> EngineStats:
        spec = self.speculator.stats if self.speculator is not None else None
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            free_blocks=self.pool.num_free,
            total_blocks=self.pool.num_blocks,
            block_size=self.pool.block_size,
            prefix_queries=self.scheduler.prefix_queries,
            prefix_hits=self.scheduler.prefix_hits,
            preemptions=self.num_preemptions,
            spec_drafts=spec.drafts if spec else 0,
            spec_proposed=spec.proposed if spec else 0,
            spec_accepted=spec.accepted if spec else 0,
        )

    def step(self) -> list[StepOutput]:
        batch = self.scheduler.schedule(self._propose())
        self.num_preemptions += len(self.scheduler.preempted)
        for seq in self.scheduler.preempted:
            seq.times.preemptions += 1
        if not batch:
            return []
        started = time.time()
        for item in batch:
            if not item.seq.times.scheduled:
                item.seq.times.scheduled = started
        sampling = [item for item in batch if item.samples]
        self.num_steps += 1
        every = self.config.attention_sample_every
        # a decode computes one known token (plus proposals); more is a prompt chunk
        computed = [item.num_tokens - len(item.proposed) for item in batch]
        prompt_tokens = sum(n for n in computed if n > 1)
        model_started = time.perf_counter()
        logits, key_mass = self.runner.run(batch, probe=every > 0 and self.num_steps % every == 0)
        for item in batch:
            item.seq.num_computed += item.num_tokens - len(item.proposed)
        outputs = self._sample(logits, sampling)  # accepted proposals join num_computed
        elapsed = time.perf_counter() - model_started  # the pass and the sampling (waits for the device)
        self.costs.record_step(elapsed, prompt_tokens, sum(item.num_tokens for item in batch))
        if self.speculator is not None:
            self.speculator.stepped(elapsed)
        for item in batch:
            self._register_full_blocks(item.seq)
            if item.proposed:
                self.scheduler.trim(item.seq)
        if key_mass is not None:
            self._observe_attention(batch, key_mass)
        for out in outputs:
            if out.finished:
                self.abort_request(out.request_id)
        return outputs

    def _propose(self) -> dict[str, list[int]]:
        """Speculative proposals for the running sequences that decode next, by request id."""
        if self.speculator is None:
            return {}
        running = self.scheduler.running
        decoding = [s for s in running if s.num_computed > 0 and s.num_uncomputed == 1]
        return self.speculator.propose(decoding, len(running)) if decoding else {}

    def _observe_attention(self, batch: list[ScheduledSeq], key_mass: torch.Tensor) -> None:
        """Each hashed block's share of its sequence's attention on this step, into the pool's
        A estimates and (with offload) to the tier's A²CR scores."""
        bs = self.config.block_size
        mass = key_mass.float().cpu()
        observations: list[Observation] = []
        for i, item in enumerate(batch):
            seq = item.seq
            kv_len = seq.num_computed
            blocks = -(-kv_len // bs)
            per_block = (
                torch.nn.functional.pad(mass[i, :kv_len], (0, blocks * bs - kv_len)).view(blocks, bs).sum(1)
            )
            total = float(per_block.sum())
            if total <= 0.0:
                continue
            shares = (per_block / total).clamp(0.0, 1.0).tolist()
            for j, block_hash in enumerate(seq.block_hashes[:blocks]):
                observation = Observation(block_hash, shares[j], blocks)
                self.pool.observe(seq.block_ids[j], observation)
                observations.append(observation)
        if observations and self._observe is not None:
            self._observe(observations)

    def _sample(self, logits: Any, sampling: list[ScheduledSeq]) -> list[StepOutput]:
        """Each sampling sequence's new tokens: one, or with proposals the accepted ones and one
        more, cut at a stop token or max_new_tokens. Finished sequences are aborted by `step`."""
        emitted, rows = self._verify(logits, sampling)
        flat_rows = [r for rs in rows for r in rs]
        top_n = [item.seq.request.logprobs for item, rs in zip(sampling, rows, strict=True) for _ in rs]
        if any(n is not None for n in top_n) and flat_rows != list(range(logits.shape[0])):
            logits = logits[flat_rows]
        logprobs = token_logprobs(logits, [t for ts in emitted for t in ts], top_n)
        outputs = []
        now = time.time()
        first = 0
        for item, tokens in zip(sampling, emitted, strict=True):
            seq, reason = item.seq, None
            lps = logprobs[first : first + len(tokens)]
            first += len(tokens)
            for i, token in enumerate(tokens):
                seq.token_ids.append(token)
                reason = self._finish_reason(seq, token)
                if reason is not None:
                    tokens, lps = tokens[: i + 1], lps[: i + 1]
                    break
            seq.num_computed = len(seq.token_ids) - 1  # the known tokens and accepted proposals
            times = seq.times
            if not times.first_token:
                times.first_token = now
            if reason is not None:
                times.finished = now
            kept = [lp for lp in lps if lp is not None]
            outputs.append(StepOutput(seq.request_id, tokens, reason, seq.cached_tokens, kept, times))
        return outputs

    def _verify(self, logits: Any, sampling: list[ScheduledSeq]) -> tuple[list[list[int]], list[list[int]]]:
        """The tokens each sequence emits and the logits row of each: one sampled token, or its
        proposals verified (`sampler.verify`, which without proposals is plain sampling)."""
        argmax = torch.argmax(logits, dim=-1).tolist()
        emitted: list[list[int]] = []
        rows: list[list[int]] = []
        first = 0
        for item in sampling:
            seq, k = item.seq, len(item.proposed)
            params = seq.request.sampling
            tokens = verify(
                logits[first : first + k + 1],
                item.proposed,
                params,
                seq.generator,
                seq.token_ids if params.repetition_penalty != 1.0 else (),
                argmax[first : first + k + 1],
            )
            if k and self.speculator is not None:
                self.speculator.verified(seq.request_id, k, len(tokens) - 1)
            emitted.append(tokens)
            rows.append(list(range(first, first + len(tokens))))
            first += k + 1
        return emitted, rows

    @staticmethod
    def _finish_reason(seq: Sequence, token: int) -> FinishReason | None:
        if token in seq.request.stop_token_ids:
            return FinishReason.STOP
        if len(seq.token_ids) - seq.num_prompt >= seq.request.max_new_tokens:
            return FinishReason.LENGTH
        return None

    def _root(self, seq: Sequence) -> bytes:
        return root_hash(self.fingerprint, seq.request.cache_salt)

    def _hashes(self, seq: Sequence, blocks: int) -> list[BlockHash]:
        """The hashes of seq's first `blocks` full blocks, hashing only those not hashed yet."""
        extend_chain(seq.chain, self._root(seq), seq.token_ids, self.config.block_size, blocks)
        return seq.chain[:blocks]

    def _prefix_hashes(self, seq: Sequence) -> list[BlockHash]:
        return self._hashes(seq, reusable_blocks(len(seq.token_ids), self.config.block_size))

    def device_prefix(self, chain: list[BlockHash]) -> int:
        # Only dict membership tests, atomic under the GIL: safe beside the engine thread.
        return next((i for i, h in enumerate(chain) if not self.pool.contains(h)), len(chain))

    def prefix_chain(self, request: EngineRequest) -> list[BlockHash]:
        """The block hashes an admission of `request` may take from the cache; the hashes are
        kept in `request.block_hashes`, so its sequence never hashes them again."""
        bs = self.config.block_size
        root = root_hash(self.fingerprint, request.cache_salt)
        blocks = reusable_blocks(len(request.prompt_token_ids), bs)
        extend_chain(request.block_hashes, root, request.prompt_token_ids, bs, blocks)
        return request.block_hashes[:blocks]

    # --- offload to the memory tiers (wicore.worker.offload) ---

    def enable_offload(
        self,
        spill: Callable[[list[Spilled]], None],
        observe: Callable[[list[Observation]], None] | None = None,
    ) -> None:
        """Hands every cached block the pool reclaims to `spill`, as a host copy, before reuse,
        and the attention observations of hashed blocks to `observe`."""
        self._observe = observe

        def on_reclaim(reclaimed: list[Reclaimed]) -> None:
            kv = read_blocks(self.runner.pool, [r.block_id for r in reclaimed])
            spill(
                [
                    Spilled(b.block_hash, b.position, kv[i], b.last_observation)
                    for i, b in enumerate(reclaimed)
                ]
            )

        self.pool.on_reclaim = on_reclaim

    def install_blocks(self, chain: list[BlockHash], start: int, kv: list[torch.Tensor]) -> int:
        """Puts loaded blocks chain[start : start + len(kv)] into the pool as cached blocks, so the
        next admission of their sequence reuses them; returns how many it installed.

        Blocks already in the pool are skipped; installing stops when the pool has no
        block to spare (the rest is recomputed).
        """
        # The blocks before `start` are on the device: hold them, or making room for the rest
        # could reclaim them and leave a gap that admission stops at.
        held = self.pool.hold(chain[:start])
        try:
            todo = [(start + i, kv[i]) for i in range(len(kv)) if not self.pool.contains(chain[start + i])]
            todo = todo[: self.pool.num_free]
            if not todo:
                return 0
            block_ids = self.pool.allocate(len(todo))
            write_blocks(self.runner.pool, block_ids, torch.stack([t for _, t in todo]))
            for block_id, (position, _) in zip(block_ids, todo, strict=True):
                self.pool.register(block_id, chain[position], position)
            self.pool.release(block_ids)
            return len(todo)
        finally:
            self.pool.release(held)

    def _register_full_blocks(self, seq: Sequence) -> None:
        full = seq.num_computed // self.config.block_size
        done = len(seq.block_hashes)
        if full <= done:
            return
        new = self._hashes(seq, full)[done:]
        for position, (block_id, h) in enumerate(zip(seq.block_ids[done:full], new, strict=True), done):
            self.pool.register(block_id, h, position)
        seq.block_hashes += new
