"""The draft-model proposer: a smaller causal LM with the target's tokenizer, run greedily.

The draft runs in its own `PagedEngine` (its own paged KV pool, block tables and prefix
cache) on the worker's device. Each step, every speculating sequence asks it for k tokens
after its current tokens, as one greedy request; all of them run together, continuously
batched. The draft's prefix cache holds each sequence's full blocks from the previous
round, so a round computes only the sequence's last partial block and the new tokens,
and a rejected proposal needs no rollback: the next round starts from the accepted
tokens, reusing what the cache still matches. Each sequence's draft block hashes are kept
between rounds (its tokens only grow), so a round hashes only its new full blocks.
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
    def __init__(self, engine: PagedEngine) -> None:
        self.engine = engine
        self._round = 0
        self._chains: dict[str, list[BlockHash]] = {}  # per sequence: its full blocks' draft hashes

    def propose(self, requests: list[tuple[Sequence, int]]) -> list[list[int]]:
        self._round += 1
        ids: list[str] = []
        for seq, k in requests:
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
        while self.engine.has_unfinished():
            for out in self.engine.step():
                proposals[out.request_id] += out.new_token_ids
        return [proposals[i] if i else [] for i in ids]

    def forget(self, request_id: str) -> None:
        self._chains.pop(request_id, None)
