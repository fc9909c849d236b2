"""Token sampling for a batch of rows, each with its own parameters and seed.

Per row, in the order transformers' `generate` applies them: repetition
penalty, then (unless greedy) temperature, top-k, top-p, min-p, and a draw from
the row's own `torch.Generator`. A row's draw depends only on its logits and its
generator, so a seeded request samples the same tokens whatever else is in the
batch. The draw takes exactly one uniform per token (inverse CDF), which is what
lets speculative decoding's verification (`verify`, which without proposals is
plain sampling) emit the same tokens as plain decoding. Greedy rows without a
penalty take the step's batched argmax. Logprobs are those
of the model's raw distribution (before any of the above).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from wicore.worker.engine_types import SamplingParams, TokenLogprob


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return generator


def apply_repetition_penalty(logits: torch.Tensor, seen: Seq[int], penalty: float) -> torch.Tensor:
    """transformers' rule: a seen token's logit is divided by the penalty if > 0, else multiplied."""
    if penalty == 1.0 or not seen:
        return logits
    index = torch.tensor(sorted(set(seen)), dtype=torch.long, device=logits.device)
    picked = logits.gather(0, index)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(0, index, picked)


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator, seen: Seq[int] = ()
) -> int:
    """Picks the next token from one row of logits [vocab]."""
    logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if params.greedy:
        return int(torch.argmax(logits).item())
    scores = logits / params.temperature
    if 0 < params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - params.top_p)
        remove[-1] = False  # always keep the most likely token
        scores = scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    probs = scores.softmax(dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return draw(probs, generator)


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """A token from probs [vocab] (unnormalised) by inverse CDF, with one uniform from `generator`."""
    cdf = probs.double().cpu().cumsum(0)
    u = float(torch.rand((), generator=generator, dtype=torch.float64)) * float(cdf[-1])
    # The first token whose cumulative mass exceeds u: one with zero mass never is.
    token = int(torch.searchsorted(cdf, torch.tensor([u], dtype=torch.float64), right=True))
    if token == len(cdf):  # u rounded up to the total: the last token with mass
        token = int(torch.nonzero(probs).max())
    return token


def verify(
    logits: torch.Tensor,
    proposed: Seq[int],
    params: SamplingParams,
    generator: torch.Generator,
    seen: Seq[int],
    argmax: Seq[int],
) -> list[int]:
    """The tokens a step emits for a sequence that proposed `proposed` (k tokens): its logits
    rows [k + 1, vocab] are the model's distributions at each proposal and after the last.

    Each position draws the model's own token as `sample` would (one uniform each) and keeps
    going while it equals the proposal there, so the emitted tokens are exactly those plain
    decoding would produce (see speculative.py). `argmax`: the rows' argmax, for greedy rows."""
    if params.greedy and params.repetition_penalty == 1.0:
        accepted = next((j for j, x in enumerate(proposed) if argmax[j] != x), len(proposed))
        return list(argmax[: accepted + 1])
    emitted: list[int] = []
    for j in range(len(proposed) + 1):
        token = sample(logits[j], params, generator, [*seen, *emitted])
        emitted.append(token)
        if j == len(proposed) or token != proposed[j]:
            break
    return emitted


def token_logprobs(
    logits: torch.Tensor, tokens: Seq[int], top_n: Seq[int | None]
) -> list[TokenLogprob | None]:
    """The chosen token's logprob and the top n alternatives, for rows that asked."""
    rows = [r for r, n in enumerate(top_n) if n is not None]
    result: list[TokenLogprob | None] = [None] * len(tokens)
    if not rows:
        return result
    logp = torch.log_softmax(logits[rows].float(), dim=-1)
    k = max(top_n[r] or 0 for r in rows)
    top_vals, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    for i, r in enumerate(rows):
        n = top_n[r] or 0
        top = tuple(zip(top_ids[i, :n].tolist(), top_vals[i, :n].tolist(), strict=True))
        result[r] = TokenLogprob(tokens[r], float(logp[i, tokens[r]]), top)
    return result
