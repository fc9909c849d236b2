from __future__ import annotations

import pytest
import torch

from wicore.worker.engine_types import SamplingParams
from wicore.worker.sampler import make_generator, sample

LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.5, 2.9])


def draws(params: SamplingParams, n: int = 400) -> list[int]:
    generator = make_generator(params.seed)
    return [sample(LOGITS, params, generator) for _ in range(n)]


def test_greedy_is_argmax() -> None:
    assert draws(SamplingParams(temperature=0.0), 5) == [1] * 5


def test_same_seed_same_tokens_and_different_seeds_differ() -> None:
    p = SamplingParams(temperature=1.0, seed=7)
    assert draws(p) == draws(p)
    assert draws(p) != draws(SamplingParams(temperature=1.0, seed=8))


def test_top_k_keeps_only_the_k_most_likely() -> None:
    assert set(draws(SamplingParams(temperature=5.0, top_k=2, seed=1))) == {1, 4}


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = LOGITS.softmax(-1)  # 1: 0.38, 4: 0.34, 2: 0.14, ...
    assert probs[1] + probs[4] > 0.7
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.7, seed=3))) == {1, 4}


def test_sampling_follows_the_distribution() -> None:
    counts = torch.bincount(torch.tensor(draws(SamplingParams(temperature=1.0, seed=11), 4000)), minlength=5)
    assert torch.allclose(counts / 4000, LOGITS.softmax(-1), atol=0.03)


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": -1.0}, {"temperature": float("nan")}, {"top_p": 0.0}, {"top_p": 1.1}, {"top_k": -1}],
)
def test_invalid_params_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)  # type: ignore[arg-type]
