"""The draft-model proposer: a smaller causal LM with the target's tokenizer, run greedily.

The draft runs in its own `PagedEngine` (its own paged KV pool, block tables and prefix
cache) on the worker's device. Each step, every speculating sequence asks it for k tokens
after its current tokens, as one greedy request; all of them run together, continuously
batched. The draft's prefix cache holds each sequence's full blocks from the previous
round, so a round computes only the sequence's last partial block and the new tokens,
and a rejected proposal needs no rollback: the next round starts from the accepted
tokens, reusing what the cache still matches. Each sequence's draft block hashes are kept
between rounds (its tokens only grow), so a round hashes only its new full blocks.

A round that fails (the draft's device out of memory, say) is logged and aborted whole:
its sequences get no proposals this step and the target's step goes on. Token ids outside
either model's embedding table (vocabularies padded differently) are never passed on.
"""

from __future__ import annotations

import logging

from wicore.errors import Overloaded
from wicore.kv.hashing import BlockHash, extend_chain, reusable_blocks, root_hash
from wicore.worker.engine_types import EngineRequest
from wicore.worker.paged_engine import PagedEngine
from wicore.worker.sequence import Sequence

log = logging.getLogger(__name__)


class DraftProposer:
    def __init__(self, engine: PagedEngine, draft_vocab: int, target_vocab: int) -> None:
        self.engine = engine
        self.draft_vocab = draft_vocab  # rows of the draft's embedding: larger ids cannot go in
        self.target_vocab = target_vocab  # ... of the target's: larger proposals cannot come out
        self._round = 0
        self._chains: dict[str, list[BlockHash]] = {}  # per sequence: its full blocks' draft hashes

    def propose(self, requests: list[tuple[Sequence, int]]) -> list[list[int]]:
        self._round += 1
        ids: list[str] = []
        for seq, k in requests:
            # Only a draft with a smaller table than the target's can be handed an id it lacks.
            if self.draft_vocab < self.target_vocab and max(seq.token_ids) >= self.draft_vocab:
                ids.append("")
                continue
            draft_id = f"{seq.request_id}#{self._round}"
            salt, bs = seq.request.cache_salt, self.engine.config.block_size
            chain = self._chains.setdefault(seq.request_id, [])
            root = root_hash(self.engine.fingerprint, salt)
            extend_chain(chain, root, seq.token_ids, bs, reusable_blocks(len(seq.token_ids), bs))
            request = EngineRequest(
                draft_id, list(seq.token_ids), k, cache_salt=salt, block_hashes=list(chain)
            )
            try:
                self.engine.add_request(request)
            except Overloaded:  # longer than the draft's pool: this sequence gets no proposals
                draft_id = ""
            ids.append(draft_id)
        proposals: dict[str, list[int]] = {i: [] for i in ids if i}
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    proposals[out.request_id] += out.new_token_ids
        except Exception:
            log.exception(
                "the draft model failed; %d sequences go without proposals this step", len(proposals)
            )
            for draft_id in list(self.engine.seqs):
                self.engine.abort_request(draft_id)
            return [[] for _ in ids]
        return [self._valid(proposals[i]) if i else [] for i in ids]

    def _valid(self, tokens: list[int]) -> list[int]:
        """The proposals up to the first the target cannot take."""
        return next((tokens[:j] for j, t in enumerate(tokens) if t >= self.target_vocab), tokens)

    def forget(self, request_id: str) -> None:
        self._chains.pop(request_id, None)
