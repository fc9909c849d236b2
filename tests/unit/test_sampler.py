from __future__ import annotations

import pytest
import torch

from wicore.worker.engine_types import SamplingParams
from wicore.worker.sampler import (
    apply_repetition_penalty,
    make_generator,
    sample,
    token_logprobs,
    verify,
)

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


def test_min_p_drops_tokens_below_a_share_of_the_top() -> None:
    # probs: 1: 0.38, 4: 0.34, 2: 0.14, 0: 0.05, 3: 0.03; min_p 0.3 keeps p >= 0.114
    assert set(draws(SamplingParams(temperature=1.0, min_p=0.3, seed=4))) == {1, 4, 2}


def test_repetition_penalty_follows_transformers() -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.tensor([1.0, -2.0, 3.0, 0.5])
    ours = apply_repetition_penalty(logits, [0, 1, 1], 1.3)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([[0, 1, 1]]), logits[None].clone())[0]
    assert torch.equal(ours, theirs)
    # Greedy with a penalty: the seen top token loses to the unseen one.
    assert (
        sample(torch.tensor([3.0, 2.5]), SamplingParams(repetition_penalty=1.5), make_generator(0), [0]) == 1
    )


def test_batch_rows_keep_their_own_parameters() -> None:
    logits = torch.stack([LOGITS, LOGITS.flip(0), LOGITS])
    params = [SamplingParams(), SamplingParams(), SamplingParams(temperature=1.0, top_k=1, seed=3)]
    argmax = logits.argmax(-1).tolist()
    tokens = [
        verify(logits[r : r + 1], (), p, make_generator(p.seed), (), argmax[r : r + 1])
        for r, p in enumerate(params)
    ]
    assert tokens == [[1], [3], [1]]


def test_logprobs_of_the_chosen_token_and_the_top_n() -> None:
    (lp,) = token_logprobs(LOGITS[None], [4], [2])
    expected = LOGITS.log_softmax(-1)
    assert lp is not None and lp.token_id == 4
    assert lp.logprob == pytest.approx(float(expected[4]))
    assert [t for t, _ in lp.top] == [1, 4]
    assert token_logprobs(LOGITS[None], [4], [None]) == [None]
