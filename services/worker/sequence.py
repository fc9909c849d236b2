"""A request's state inside the paged engine.

    token_ids:  [ prompt ............ | output ...... ]
    computed:   [ KV in the pool ......... ]            num_computed
    cached:     [ from prefix cache ]                   cached_tokens (at first admission)
    blocks:     [ b3 | b9 | b1 | b4 ]  block_ids, block_size tokens each, last one may be partial
    hashes:     [ h0 | h1 | h2 ]       block_hashes: one per full, computed block
    chain:      [ h0 | h1 | h2 | h3 ]  every full block's hash known so far, each hashed once

After preemption (recompute) the KV is dropped (num_computed = 0, no blocks) and
the sequence waits again; its full blocks stay in the prefix cache, so resuming
usually reloads most of them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from wicore.kv.hashing import BlockHash
from wicore.worker.engine_types import EngineRequest, RequestTimes


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"


@dataclass(slots=True)
class Sequence:
    request: EngineRequest
    generator: torch.Generator
    arrival: int  # admission order; preemption takes the latest arrivals first
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[BlockHash] = field(default_factory=list)
    chain: list[BlockHash] = field(default_factory=list)  # kept across preemption: tokens only grow
    cached_tokens: int = 0
    admitted_once: bool = False
    status: SeqStatus = SeqStatus.WAITING
    num_preemptions: int = 0
    times: RequestTimes = field(default_factory=RequestTimes)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.request.prompt_token_ids)
        if not self.chain:
            self.chain = list(self.request.block_hashes)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_prompt(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    def blocks_needed(self, num_tokens: int, block_size: int) -> int:
        """Blocks to add so that the first num_tokens tokens have a slot."""
        return max(0, -(-num_tokens // block_size) - len(self.block_ids))
