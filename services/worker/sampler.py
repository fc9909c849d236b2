"""Token sampling: greedy, temperature, top-k, top-p, per-request seeded.

The order of the filters is that of transformers' `generate` (temperature, then
top-k, then top-p), so a seeded request samples from the same distribution.
"""

from __future__ import annotations

import torch

from wicore.worker.engine_types import SamplingParams


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return generator


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Picks the next token from one row of logits [vocab]."""
    logits = logits.float()
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
    return int(torch.multinomial(probs.cpu(), 1, generator=generator).item())
