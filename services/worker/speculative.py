"""Speculative decoding: cheap proposals, verified by the model in the engine's own step.

    known:     [ ... t ]                    the sequence's last token, not computed yet
    proposed:            [ x1 x2 x3 ]       k = 3 (ngram lookup or a draft model)
    computed:  [ ... t  x1 x2 x3 ]          in the packed pass, like a 4-token prefill chunk
    logits:        P0  P1 P2 P3             one row per position
    verify:    y0 from P0; y0 == x1? then y1 from P1; y1 == x2? ... the first mismatch (or y3)
               ends the run: the step emits x1..xa and one more token.

A step at batch 1 is bound by reading the weights, so scoring k + 1 positions costs
little more than one: every accepted proposal is a token nearly for free.

Exactness. Proposals are deterministic (a lookup, or the draft's argmax), i.e. a proposal
distribution q that puts all its mass on x. Rejection sampling with such a q accepts x
with probability p(x) and otherwise draws from p with x removed: the target distribution
p exactly. Drawing the target's own token y from p with the sequence's next uniform and
accepting x when y == x is that rule (the sampler draws by inverse CDF, one uniform per
emitted token), so a request's output is the same token for token with and without
speculation: greedy or sampled, seeded or not (given the same logits).

Rollback. The KV of rejected proposals lies at positions >= num_computed: never read,
overwritten later, and its block never hashed (only full computed blocks are). Blocks
allocated for them past the sequence's end are released after the step.

Adaptive k. Each sequence keeps an estimate `alpha` of its per-token acceptance
(exponential average over its verifications, starting from the worker's average over all
of them) and proposes the k that maximises the expected tokens per step,
(1 - alpha^(k+1)) / (1 - alpha), over the step's cost, 1 + (TOKEN_COST + d) * k, where d is
the proposer's measured time per proposed token relative to a step (a draft model's
forward passes; nil for a lookup). When no k > 0 pays, the sequence stops proposing for a
back-off of steps (doubling) and then tries k = 1 again. A step with more running sequences
than `disable_by_batch_size` proposes nothing: decode is no longer bandwidth-bound there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from wicore.config import SpeculativeConfig
from wicore.worker.sequence import Sequence

# Extra cost of verifying one more position in a step of up to 8 sequences, relative to the
# step: 0.10-0.16 per position at k = 4 on CPU with SmolLM2-135M (benchmark/spec_bench.py's
# verify-cost table; batch 16 costs 0.27, beyond disable_by_batch_size's default).
TOKEN_COST = 0.12
ALPHA_START = 0.5  # the worker's acceptance estimate before its first verification
ALPHA_WEIGHT = 0.3  # weight of the latest verification in a sequence's estimate
PRIOR_WEIGHT = 0.05  # ... and in the worker's (a new sequence's starting estimate)
COST_WEIGHT = 0.1  # weight of the latest step in the measured step and proposal times
PAUSE_FIRST, PAUSE_MAX = 4, 64  # steps without proposals after a k = 0 decision


@dataclass(slots=True)
class SpecState:
    """One sequence's speculation: its acceptance estimate and back-off."""

    alpha: float = ALPHA_START
    pause: int = 0  # steps left without proposals
    backoff: int = PAUSE_FIRST  # the next pause's length
    probing: bool = False  # the next verification decides whether the pause ends


@dataclass(slots=True)
class SpecStats:
    """Since start: steps that verified proposals, and the tokens proposed and accepted (those
    steps emitted accepted + drafts tokens: each accepted run and one more)."""

    drafts: int = 0
    proposed: int = 0
    accepted: int = 0


def best_k(alpha: float, k_max: int, token_cost: float = TOKEN_COST) -> int:
    """The k in 0..k_max with the most expected tokens per unit of step cost."""

    def rate(k: int) -> float:
        expected = float(k + 1) if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)
        return expected / (1.0 + token_cost * k)

    return max(range(k_max + 1), key=lambda k: (rate(k), -k))


class Proposer(Protocol):
    def propose(self, requests: list[tuple[Sequence, int]]) -> list[list[int]]:
        """Up to k proposed next tokens for each (sequence, k); fewer (or none) where it has none."""
        ...

    def forget(self, request_id: str) -> None:
        """The sequence finished or was aborted: drop what the proposer keeps for it."""
        ...


@dataclass(slots=True)
class _NgramIndex:
    positions: list[dict[tuple[int, ...], int]]  # per n: n-gram -> the index after its latest occurrence
    indexed: int = 0  # n-grams ending before this index are in `positions`


class NgramProposer:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's
    last n tokens (n from ngram_max down to ngram_min), in its prompt or its output.

    Each sequence's n-grams are indexed incrementally (tokens only grow), so a lookup costs
    O(new tokens) per step, not O(context)."""

    def __init__(self, ngram_min: int, ngram_max: int) -> None:
        self.sizes = list(range(ngram_max, ngram_min - 1, -1))
        self._indexes: dict[str, _NgramIndex] = {}

    def propose(self, requests: list[tuple[Sequence, int]]) -> list[list[int]]:
        return [self._propose(seq.request_id, seq.token_ids, k) for seq, k in requests]

    def forget(self, request_id: str) -> None:
        self._indexes.pop(request_id, None)

    def _propose(self, request_id: str, tokens: list[int], k: int) -> list[int]:
        index = self._indexes.get(request_id)
        if index is None:
            index = self._indexes[request_id] = _NgramIndex([{} for _ in self.sizes])
        end = len(tokens)
        # Index every n-gram that has a following token (it ends before `end`), oldest first,
        # so each n-gram maps to its latest occurrence before the current suffix.
        for stop in range(max(index.indexed, 1), end):
            for n, table in zip(self.sizes, index.positions, strict=True):
                if stop >= n:
                    table[tuple(tokens[stop - n : stop])] = stop
        index.indexed = max(index.indexed, end)
        for n, table in zip(self.sizes, index.positions, strict=True):
            if end < n:
                continue
            follows = table.get(tuple(tokens[end - n :]))
            if follows is not None:
                return tokens[follows : follows + k]
        return []


@dataclass(slots=True)
class Speculator:
    """Decides who proposes how many tokens in a step, and learns from the verifications."""

    config: SpeculativeConfig
    proposer: Proposer
    stats: SpecStats = field(default_factory=SpecStats)
    prior: float = ALPHA_START  # the worker's acceptance estimate: where a new sequence starts
    step_s: float = 0.0  # measured: a model step's time
    propose_s: float = 0.0  # measured: the proposer's time per proposed position
    _states: dict[str, SpecState] = field(default_factory=dict)

    @property
    def token_cost(self) -> float:
        """What one more proposed position costs, relative to a step: verifying it and proposing it."""
        return TOKEN_COST + (self.propose_s / self.step_s if self.step_s > 0 else 0.0)

    def propose(self, decoding: list[Sequence], running: int) -> dict[str, list[int]]:
        """Proposals for the sequences about to decode, by request id (none above the batch limit)."""
        if running > self.config.disable_by_batch_size:
            return {}
        asked: list[tuple[Sequence, int]] = []
        for seq in decoding:
            k = self._k(seq)
            room = seq.request.max_new_tokens - (len(seq.token_ids) - seq.num_prompt) - 1
            k = min(k, room)  # the step emits at most k + 1 tokens; never past max_new_tokens
            if k > 0:
                asked.append((seq, k))
        if not asked:
            return {}
        started = time.perf_counter()
        proposals = self.proposer.propose(asked)
        per_position = (time.perf_counter() - started) / max(k for _, k in asked)
        self.propose_s = _average(self.propose_s, per_position)
        return {seq.request_id: p for (seq, _), p in zip(asked, proposals, strict=True) if p}

    def stepped(self, seconds: float) -> None:
        """The engine's model step took `seconds` (the scale of the proposer's cost)."""
        self.step_s = _average(self.step_s, seconds)

    def _k(self, seq: Sequence) -> int:
        state = self._states.get(seq.request_id)
        if state is None:
            state = self._states[seq.request_id] = SpecState(alpha=self.prior)
        if state.pause > 0:
            state.pause -= 1
            if state.pause == 0:
                state.probing = True
            return 0
        if state.probing:
            return 1
        k = best_k(state.alpha, self.config.num_tokens, self.token_cost)
        if k == 0:
            state.pause, state.backoff = state.backoff, min(2 * state.backoff, PAUSE_MAX)
        return k

    def verified(self, request_id: str, proposed: int, accepted: int) -> None:
        """A step verified `proposed` tokens of this sequence and accepted the first `accepted`."""
        self.stats.drafts += 1
        self.stats.proposed += proposed
        self.stats.accepted += accepted
        rate = accepted / proposed
        self.prior += PRIOR_WEIGHT * (rate - self.prior)
        state = self._states.setdefault(request_id, SpecState(alpha=self.prior))
        state.alpha += ALPHA_WEIGHT * (rate - state.alpha)
        if state.probing:
            state.probing = False
            if accepted > 0:
                state.backoff = PAUSE_FIRST

    def forget(self, request_id: str) -> None:
        self._states.pop(request_id, None)
        self.proposer.forget(request_id)


def _average(average: float, latest: float) -> float:
    """A measured time's exponential average (the first measurement starts it)."""
    return average + COST_WEIGHT * (latest - average) if average else latest
