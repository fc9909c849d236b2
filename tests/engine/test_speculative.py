"""Speculative decoding in the paged engine: ngram and draft-model proposals, verified in the step.

Greedy output must equal `generate` token for token with speculation on, for every family,
with chunked prefill and preemption; the block pools are checked after every step. Sampled
output must equal the same seeded request without speculation (the verification draws one
uniform per emitted token, as plain sampling does), and the verification rule itself must
reproduce the model's distribution (chi-square against the exact softmax).
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wicore.config import SpecMethod, SpeculativeConfig, load_config
from wicore.errors import ConfigError
from wicore.worker.app import LoadedModel, load_model, make_speculator
from wicore.worker.async_engine import AsyncEngine
from wicore.worker.batch_scheduler import BatchScheduler
from wicore.worker.block_pool import BlockPool
from wicore.worker.draft import DraftProposer
from wicore.worker.engine_types import EngineRequest, FinishReason, SamplingParams, StepOutput
from wicore.worker.output import Delta
from wicore.worker.paged_engine import EngineConfig, PagedEngine
from wicore.worker.sampler import make_generator, verify
from wicore.worker.sequence import Sequence
from wicore.worker.speculative import TOKEN_COST, NgramProposer, Speculator, best_k

from tiny_models import FAMILIES, generate_greedy, run_engine, save_tiny

# Repetitive prompts give prompt lookup something to find; the tiny random models repeat too.
PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "Héllo",
    "one two three four one two three four one two",
]


def load(path: Path, **settings: object) -> tuple[LoadedModel, Speculator | None]:
    config = load_config(
        None, {}, {"worker.model": str(path), **{f"worker.{k}": v for k, v in settings.items()}}
    )
    loaded = load_model(config)
    return loaded, make_speculator(config, loaded)


def engine(loaded: LoadedModel, speculator: Speculator | None, **config: int) -> PagedEngine:
    return PagedEngine(loaded.model, EngineConfig(**config), loaded.fingerprint, speculator)


def check(eng: PagedEngine) -> None:
    """After every step: a running sequence holds exactly its computed tokens' blocks (none kept
    for rejected proposals), and a draft model's pool is whole."""
    for s in eng.scheduler.running:
        assert len(s.block_ids) == -(-s.num_computed // eng.pool.block_size)
    if eng.speculator is not None and isinstance(eng.speculator.proposer, DraftProposer):
        eng.speculator.proposer.engine.pool.check_integrity()


def run(eng: PagedEngine, requests: list[EngineRequest]) -> dict[str, list[StepOutput]]:
    return run_engine(eng, requests, check)


def tokens(outputs: list[StepOutput]) -> list[int]:
    return [t for out in outputs for t in out.new_token_ids]


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(request.param, tmp_path_factory.mktemp("models") / f"tiny-{request.param}")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def other_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same shape and tokenizer, other weights: a draft that is often wrong."""
    return save_tiny("llama", tmp_path_factory.mktemp("models") / "tiny-llama-other", seed=1)


def check_greedy(
    loaded: LoadedModel, speculator: Speculator, max_new: int = 24, **config: int
) -> dict[str, list[StepOutput]]:
    ids = [list(loaded.tokenizer(p).input_ids) for p in PROMPTS]
    expected = [generate_greedy(loaded.model, i, max_new) for i in ids]  # before the engine patches it
    eng = engine(loaded, speculator, **config)
    outputs = run(eng, [EngineRequest(f"r{i}", x, max_new) for i, x in enumerate(ids)])
    for i in range(len(ids)):
        assert tokens(outputs[f"r{i}"]) == expected[i], (PROMPTS[i], config)
        assert outputs[f"r{i}"][-1].finish_reason is FinishReason.LENGTH
    return outputs


def test_ngram_greedy_output_is_generates_for_every_family(family_dir: Path) -> None:
    loaded, speculator = load(family_dir, **{"speculative.method": "ngram"})
    assert speculator is not None
    # Block size 4 and a budget of 9 tokens: chunked prefill, proposals cut by the budget.
    outputs = check_greedy(loaded, speculator, num_blocks=96, block_size=4, max_num_batched_tokens=9)
    stats = speculator.stats
    assert stats.drafts > 0 and stats.proposed > 0
    if stats.accepted:  # accepted runs arrive as several tokens in one step
        assert any(len(out.new_token_ids) > 1 for outs in outputs.values() for out in outs)


def test_ngram_accepts_and_rejects_on_a_repeating_model(llama_dir: Path) -> None:
    """The tiny llama repeats itself: the test above exercises both verification outcomes there."""
    loaded, speculator = load(llama_dir, **{"speculative.method": "ngram"})
    assert speculator is not None
    check_greedy(loaded, speculator, num_blocks=96, block_size=4)
    stats = speculator.stats
    assert 0 < stats.accepted < stats.proposed


@pytest.fixture()
def free_drafts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny draft costs as much as its tiny target (both are Python overhead), so the cost
    model would rightly stop proposing; these tests are about the mechanics, so proposals are
    priced as a lookup's. (The measured cost is tested below, with a slow proposer.)"""
    monkeypatch.setattr(Speculator, "token_cost", property(lambda self: TOKEN_COST))


@pytest.mark.usefixtures("free_drafts")
def test_a_draft_model_that_is_the_target_is_always_accepted(llama_dir: Path) -> None:
    loaded, speculator = load(
        llama_dir, **{"speculative.method": "draft", "speculative.draft_model": str(llama_dir)}
    )
    assert speculator is not None
    outputs = check_greedy(loaded, speculator, max_new=30, num_blocks=96, block_size=4)
    stats = speculator.stats
    assert stats.proposed > 0 and stats.accepted == stats.proposed
    steps = max(len(outs) for outs in outputs.values())
    assert steps < 30 / 2  # adaptive k grew: several tokens per step


@pytest.mark.usefixtures("free_drafts")
def test_a_wrong_draft_model_changes_nothing_in_the_output(llama_dir: Path, other_llama_dir: Path) -> None:
    loaded, speculator = load(
        llama_dir, **{"speculative.method": "draft", "speculative.draft_model": str(other_llama_dir)}
    )
    assert speculator is not None
    check_greedy(loaded, speculator, num_blocks=96, block_size=4, max_num_batched_tokens=9)
    stats = speculator.stats
    assert stats.proposed > stats.accepted  # rejections happened, and were rolled back


def test_speculation_under_preemption_matches_generate(llama_dir: Path) -> None:
    loaded, speculator = load(llama_dir, **{"speculative.method": "ngram"})
    assert speculator is not None
    ids = [list(loaded.tokenizer(p).input_ids) for p in PROMPTS]
    expected = [generate_greedy(loaded.model, i, 24) for i in ids]
    eng = engine(loaded, speculator, num_blocks=24, block_size=4)  # 96 slots for ~300 tokens
    outputs = run(eng, [EngineRequest(f"r{i}", x, 24) for i, x in enumerate(ids)])
    assert [tokens(outputs[f"r{i}"]) for i in range(len(ids))] == expected
    assert eng.num_preemptions > 0 and speculator.stats.accepted > 0


SAMPLED = [
    SamplingParams(temperature=0.8, seed=1),
    SamplingParams(temperature=1.0, top_k=20, top_p=0.9, min_p=0.02, seed=2),
    SamplingParams(temperature=0.7, repetition_penalty=1.2, seed=3),
    SamplingParams(temperature=0.0, repetition_penalty=1.3),
]


@pytest.mark.usefixtures("free_drafts")
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_sampled_output_is_the_same_with_and_without_speculation(llama_dir: Path, method: str) -> None:
    plain, _ = load(llama_dir)
    ids = list(plain.tokenizer(PROMPTS[0]).input_ids)
    requests = [
        EngineRequest(f"s{i}", ids, 32, sampling=params, logprobs=2) for i, params in enumerate(SAMPLED)
    ]
    expected = run(engine(plain, None, num_blocks=96, block_size=4), requests)
    settings = {"speculative.method": method, "speculative.draft_model": str(llama_dir)}
    loaded, speculator = load(llama_dir, **settings)
    assert speculator is not None
    got = run(engine(loaded, speculator, num_blocks=96, block_size=4), requests)
    assert speculator.stats.drafts > 0
    if method == "draft":  # the target as its own draft: sampled proposals accepted too
        assert speculator.stats.accepted > 0
    for r in requests:
        assert tokens(got[r.request_id]) == tokens(expected[r.request_id]), r.sampling
        want = [lp for out in expected[r.request_id] for lp in out.logprobs]
        have = [lp for out in got[r.request_id] for lp in out.logprobs]
        assert [(lp.token_id, [t for t, _ in lp.top]) for lp in have] == [
            (lp.token_id, [t for t, _ in lp.top]) for lp in want
        ]
        assert [lp.logprob for lp in have] == pytest.approx([lp.logprob for lp in want], abs=1e-4)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# Upper 0.1 % point of the chi-square distribution with 5 degrees of freedom (6 tokens).
CHI2_CRITICAL_DF5 = 20.515


def test_verification_keeps_the_models_distribution() -> None:
    """The rule is rejection sampling for a deterministic proposal: the first emitted token
    follows the model's softmax at that position whatever was proposed, and after an accepted
    proposal the next one follows the next position's softmax. 20,000 fixed-seed trials,
    chi-square at significance 0.001 (a rule that kept every proposal scores in the thousands)."""
    logits = torch.tensor([[1.0, 0.2, -0.5, 0.7, 0.0, -1.0], [0.1, 0.9, 0.4, -0.3, 0.6, -0.2]])
    p0, p1 = logits.softmax(-1)
    params = SamplingParams(temperature=1.0)
    generator = make_generator(1234)
    first = torch.zeros(6)
    after_accept = torch.zeros(6)
    argmax = logits.argmax(-1).tolist()
    for _ in range(20_000):
        emitted = verify(logits, [3], params, generator, (), argmax)
        first[emitted[0]] += 1
        if emitted[0] == 3:
            assert len(emitted) == 2
            after_accept[emitted[1]] += 1
        else:
            assert len(emitted) == 1
    assert chi_square(first, p0) < CHI2_CRITICAL_DF5
    assert chi_square(after_accept, p1) < CHI2_CRITICAL_DF5
    always_accepted = torch.zeros(6)
    always_accepted[3] = first.sum()
    assert chi_square(always_accepted, p0) > 100 * CHI2_CRITICAL_DF5


def test_a_stop_token_inside_an_accepted_run_ends_the_output_there(llama_dir: Path) -> None:
    loaded, speculator = load(llama_dir, **{"speculative.method": "ngram"})
    assert speculator is not None
    ids = list(loaded.tokenizer(PROMPTS[0]).input_ids)
    free = generate_greedy(loaded.model, ids, 40)
    eng = engine(loaded, speculator, num_blocks=96, block_size=4)
    runs = run(eng, [EngineRequest("free", ids, 40)])["free"]
    position = next(  # a token inside a multi-token step that did not occur before it
        sum(len(o.new_token_ids) for o in runs[:i]) + j
        for i, out in enumerate(runs)
        for j in range(1, len(out.new_token_ids))
        if out.new_token_ids[j] not in free[: sum(len(o.new_token_ids) for o in runs[:i]) + j]
    )
    stop = free[position]
    got = run(eng, [EngineRequest("stop", ids, 40, stop_token_ids=frozenset({stop}))])["stop"]
    assert tokens(got) == free[: position + 1]
    assert got[-1].finish_reason is FinishReason.STOP


def test_max_tokens_is_exact_with_speculation(llama_dir: Path) -> None:
    loaded, speculator = load(llama_dir, **{"speculative.method": "ngram"})
    assert speculator is not None
    ids = list(loaded.tokenizer(PROMPTS[3]).input_ids)
    free = generate_greedy(loaded.model, ids, 12)
    eng = engine(loaded, speculator, num_blocks=96, block_size=4)
    for max_new in range(1, 13):
        out = run(eng, [EngineRequest(f"m{max_new}", ids, max_new)])[f"m{max_new}"]
        assert tokens(out) == free[:max_new]
    assert speculator.stats.accepted > 0


def test_aborting_a_speculating_request_releases_everything(llama_dir: Path) -> None:
    loaded, speculator = load(llama_dir, **{"speculative.method": "ngram"})
    assert speculator is not None
    eng = engine(loaded, speculator, num_blocks=96, block_size=4)
    ids = list(loaded.tokenizer(PROMPTS[3]).input_ids)
    eng.add_request(EngineRequest("a", ids, 40))
    eng.add_request(EngineRequest("b", ids, 40))
    while speculator.stats.accepted == 0:
        eng.step()
        eng.pool.check_integrity()
    eng.abort_request("a")
    eng.pool.check_integrity()
    assert "a" not in speculator._states
    while eng.has_unfinished():
        eng.step()
        eng.pool.check_integrity()
    assert eng.pool.num_free == eng.pool.num_blocks


# --- the proposer, adaptive k and the batch limit ---


def test_best_k_follows_the_acceptance() -> None:
    assert best_k(0.0, 8) == 0
    assert best_k(0.05, 8) == 0  # below the cost of one more position: no proposals
    assert best_k(1.0, 8) == 8
    ks = [best_k(a / 20, 8) for a in range(21)]
    assert ks == sorted(ks) and ks[0] == 0 and ks[-1] == 8


def seq(request_id: str, token_ids: list[int], max_new: int = 100) -> Sequence:
    s = Sequence(EngineRequest(request_id, token_ids, max_new), make_generator(0), arrival=0)
    s.num_computed = len(token_ids) - 1
    return s


class Fixed:
    """A proposer that always proposes the same tokens (k of them)."""

    def propose(self, requests: list[tuple[Sequence, int]]) -> list[list[int]]:
        return [[7] * k for _, k in requests]

    def forget(self, request_id: str) -> None:
        pass


def test_a_sequence_that_never_accepts_stops_proposing_and_probes_again() -> None:
    spec = Speculator(SpeculativeConfig(method=SpecMethod.NGRAM, num_tokens=4), Fixed())
    s = seq("r", [1, 2, 3])
    asked = []
    for _ in range(200):
        proposals = spec.propose([s], running=1)
        asked.append(len(proposals.get("r", [])))
        if proposals:
            spec.verified("r", len(proposals["r"]), 0)
    first_pause = asked.index(0)
    assert first_pause <= 8  # a few rejected steps, then it stops paying
    assert sum(asked) < 40  # mostly silent: probes of one token, ever further apart
    probes = [i for i, k in enumerate(asked) if i > first_pause and k]
    assert probes and all(asked[i] == 1 for i in probes)
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0]


def test_k_grows_with_acceptance_and_respects_max_tokens() -> None:
    spec = Speculator(SpeculativeConfig(method=SpecMethod.NGRAM, num_tokens=6), Fixed())
    s = seq("r", [1, 2, 3], max_new=100)
    ks = []
    for _ in range(6):
        k = len(spec.propose([s], running=1)["r"])
        ks.append(k)
        spec.verified("r", k, k)
    assert ks[-1] == 6 and ks[0] < 6
    s.token_ids += [5] * 97  # 97 of 100 new tokens produced: room for 2 proposals + 1
    assert len(spec.propose([s], running=1)["r"]) == 2


class Slow(Fixed):
    """Takes `seconds` per proposed position, like a draft model's forward passes."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def propose(self, requests: list[tuple[Sequence, int]]) -> list[list[int]]:
        time.sleep(self.seconds * max(k for _, k in requests))
        return super().propose(requests)


def test_a_proposer_as_slow_as_the_model_stops_proposing_even_when_always_right() -> None:
    spec = Speculator(SpeculativeConfig(method=SpecMethod.DRAFT, draft_model="d", num_tokens=4), Slow(0.01))
    s = seq("r", [1, 2, 3])
    asked = []
    for _ in range(12):
        proposals = spec.propose([s], running=1)
        asked.append(len(proposals.get("r", [])))
        if proposals:
            spec.verified("r", asked[-1], asked[-1])  # every proposal accepted
        spec.stepped(0.01)  # a model step takes as long as one proposed position
    assert spec.token_cost > 1.0
    assert asked[0] > 0 and asked[-4:] == [0, 0, 0, 0]


def test_a_new_sequence_starts_from_the_workers_acceptance() -> None:
    spec = Speculator(SpeculativeConfig(method=SpecMethod.NGRAM, num_tokens=4), Fixed())
    for i in range(60):  # many sequences, every proposal rejected
        r = seq(f"old{i}", [1, 2, 3])
        if proposals := spec.propose([r], running=1):
            spec.verified(r.request_id, len(proposals[r.request_id]), 0)
        spec.forget(r.request_id)
    assert spec.prior < spec.token_cost  # below break-even: a first proposal would not pay
    assert spec.propose([seq("new", [1, 2, 3])], running=1) == {}  # it does not pay to try at once


def test_no_proposals_above_the_batch_limit() -> None:
    spec = Speculator(SpeculativeConfig(method=SpecMethod.NGRAM, disable_by_batch_size=2), Fixed())
    seqs = [seq(f"r{i}", [1, 2, 3]) for i in range(3)]
    assert spec.propose(seqs[:2], running=2).keys() == {"r0", "r1"}
    assert spec.propose(seqs, running=3) == {}


def test_ngram_proposes_what_followed_the_latest_longest_match() -> None:
    ngram = NgramProposer(2, 3)
    #          0  1  2  3  4  5  6  7  8  9
    tokens = [1, 2, 3, 9, 1, 2, 4, 8, 1, 2]
    assert ngram.propose([(seq("a", tokens), 3)]) == [[4, 8, 1]]  # "1 2" last seen at 4..5
    tokens = [5, 1, 2, 3, 6, 1, 2, 7, 5, 1, 2]
    assert ngram.propose([(seq("b", tokens), 2)]) == [[3, 6]]  # "5 1 2" beats the later "1 2"
    assert ngram.propose([(seq("c", [1, 2, 3, 4]), 2)]) == [[]]


def brute_force(tokens: list[int], sizes: list[int], k: int) -> list[int]:
    for n in sizes:
        if len(tokens) < n:
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=6), min_size=1, max_size=12))
def test_ngram_index_grown_step_by_step_equals_a_full_search(chunks: list[list[int]]) -> None:
    ngram = NgramProposer(1, 3)
    tokens: list[int] = []
    for chunk in chunks:
        tokens += chunk
        assert ngram.propose([(seq("r", list(tokens)), 4)]) == [brute_force(tokens, [3, 2, 1], 4)]


@pytest.mark.parametrize(
    ("settings_", "field"),
    [
        ({"num_tokens": 0}, "worker.speculative.num_tokens"),
        ({"num_tokens": 17}, "worker.speculative.num_tokens"),
        ({"ngram_min": 3, "ngram_max": 2}, "worker.speculative.ngram_min, ngram_max"),
        ({"method": "draft"}, "worker.speculative.draft_model"),
        ({"method": "medusa"}, "worker.speculative.method"),
        ({"disable_by_batch_size": 0}, "worker.speculative.disable_by_batch_size"),
    ],
)
def test_bad_speculative_settings_are_refused_naming_the_field(
    settings_: dict[str, object], field: str
) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(field)}"):
        load_config(None, {}, {f"worker.speculative.{k}": v for k, v in settings_.items()})


def test_a_draft_with_another_tokenizer_is_refused(llama_dir: Path, tmp_path: Path) -> None:
    from tiny_models import build_tokenizer

    other = save_tiny("llama", tmp_path / "other-vocab")
    build_tokenizer(vocab_size=300).save_pretrained(other)
    with pytest.raises(ConfigError, match=r"^worker\.speculative\.draft_model: .* another tokenizer"):
        load(llama_dir, **{"speculative.method": "draft", "speculative.draft_model": str(other)})


# --- through AsyncEngine: stop strings ---


async def stream(eng: AsyncEngine, request: EngineRequest, stop: tuple[str, ...]) -> list[Delta]:
    return [delta async for delta in eng.generate(request, stop)]


def stream_run(
    loaded: LoadedModel, speculator: Speculator | None, request: EngineRequest, stop: tuple[str, ...]
) -> list[Delta]:
    eng = AsyncEngine(engine(loaded, speculator, num_blocks=96, block_size=4), loaded.tokenizer)
    eng.start()
    try:
        return asyncio.run(stream(eng, request, stop))
    finally:
        eng.stop()


def test_a_stop_string_inside_an_accepted_run_ends_the_text_and_the_count_there(llama_dir: Path) -> None:
    plain, _ = load(llama_dir)
    ids = list(plain.tokenizer(PROMPTS[3]).input_ids)
    loaded, speculator = load(llama_dir, **{"speculative.method": "ngram"})
    free = stream_run(loaded, speculator, EngineRequest("free", ids, 40), ())
    tokens = [t for d in free for t in d.token_ids]
    text = "".join(d.text for d in free)

    def new_suffix(i: int) -> str:
        """The shortest end (>= 3 characters) of the text through token i that occurs nowhere
        earlier in the text: as a stop string, token i completes it."""
        upto = plain.tokenizer.decode(tokens[: i + 1], skip_special_tokens=True)
        size = next(n for n in range(3, len(upto) + 1) if text.find(upto[-n:]) == len(upto) - n)
        return upto[-size:]

    starts = [sum(len(d.token_ids) for d in free[:n]) for n in range(len(free))]
    cut = next(  # a token inside a delta of several tokens, not its last, that changes the text
        start + j
        for start, d in zip(starts, free, strict=True)
        for j in range(len(d.token_ids) - 1)
        if start + j > 0 and plain.tokenizer.decode(tokens[start + j : start + j + 1]).strip()
    )
    stop = (new_suffix(cut),)
    request = EngineRequest("s", ids, 40, logprobs=1)
    expected = stream_run(plain, None, request, stop)
    got = stream_run(*load(llama_dir, **{"speculative.method": "ngram"}), request, stop)
    assert [t for d in expected for t in d.token_ids] == tokens[: cut + 1]
    assert [t for d in got for t in d.token_ids] == tokens[: cut + 1]
    assert [lp.token_id for d in got for lp in d.logprobs] == tokens[: cut + 1]
    assert "".join(d.text for d in got) == "".join(d.text for d in expected)
    assert stop[0] not in "".join(d.text for d in got)
    assert got[-1].completion_tokens == expected[-1].completion_tokens == cut + 1
    assert got[-1].finish_reason is expected[-1].finish_reason is FinishReason.STOP


# --- speculation takes only what nobody else needs ---


def scheduled_decode(pool: BlockPool, prompts: list[int]) -> BatchScheduler:
    """A scheduler whose sequences (prompts of the given lengths) have computed their prompts and
    sampled one token each, as after their first engine step."""
    scheduler = BatchScheduler(pool, max_running=8, max_num_batched_tokens=64, prefix_hashes=lambda s: [])
    seqs = [
        Sequence(EngineRequest(f"r{i}", list(range(1, n + 1)), 10), make_generator(0), arrival=i)
        for i, n in enumerate(prompts)
    ]
    for s in seqs:
        scheduler.add(s)
    for item in scheduler.schedule():
        item.seq.num_computed += item.num_tokens
        item.seq.token_ids.append(99)
    return scheduler


def test_proposals_never_take_a_block_another_sequence_needs() -> None:
    # Block size 4: r0 decodes at position 3 (its block 0), r1 at position 4 (it needs a new block).
    scheduler = scheduled_decode(BlockPool(3, 4), [3, 4])
    batch = scheduler.schedule({"r0": [7, 8]})
    assert scheduler.preempted == []
    assert [(item.seq.request_id, item.num_tokens, item.proposed) for item in batch] == [
        ("r0", 1, ()),  # the last free block went to r1's own token, none was left for proposals
        ("r1", 1, ()),
    ]


def test_proposals_take_free_blocks_before_cached_prefixes_and_give_them_back() -> None:
    pool = BlockPool(3, 4)
    scheduler = scheduled_decode(pool, [3])
    cached = pool.allocate(1)
    pool.register(cached[0], "a" * 32, 0)
    pool.release(cached)  # one block free, one holding a reusable prefix
    batch = scheduler.schedule({"r0": [7, 8]})  # positions 4..5: one more block
    assert batch[0].proposed == (7, 8)
    assert pool.contains("a" * 32)  # the free block was taken, not the cached one
    batch[0].seq.num_computed += 1  # none accepted: the engine trims the proposals' block
    scheduler.trim(batch[0].seq)
    assert pool.num_free == 2 and pool.contains("a" * 32)
    pool.check_integrity()


def test_proposals_come_after_admissions_within_the_budget() -> None:
    pool = BlockPool(16, 4)
    scheduler = scheduled_decode(pool, [3])
    scheduler.budget = 6
    scheduler.add(Sequence(EngineRequest("new", [1, 2, 3, 4], 10), make_generator(0), arrival=5))
    batch = scheduler.schedule({"r0": [7, 8, 9]})
    # r0's token, then the newcomer's 4-token prompt, then 1 proposal in the budget left.
    assert [(item.seq.request_id, item.num_tokens, item.proposed) for item in batch] == [
        ("r0", 2, (7,)),
        ("new", 4, ()),
    ]


@pytest.mark.usefixtures("free_drafts")
def test_a_failing_draft_round_costs_its_proposals_only(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded, speculator = load(
        llama_dir, **{"speculative.method": "draft", "speculative.draft_model": str(llama_dir)}
    )
    assert speculator is not None and isinstance(speculator.proposer, DraftProposer)
    proposer = speculator.proposer
    target = seq("t", list(loaded.tokenizer(PROMPTS[0]).input_ids))
    real_step = proposer.engine.step
    calls = 0

    def failing_once() -> list[StepOutput]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("draft device out of memory")
        return real_step()

    monkeypatch.setattr(proposer.engine, "step", failing_once)
    assert proposer.propose([(target, 3)]) == [[]]
    assert not proposer.engine.has_unfinished()  # the failed round's requests are gone
    proposer.engine.pool.check_integrity()
    again = proposer.propose([(target, 3)])
    assert len(again[0]) == 3


def test_draft_tokens_outside_either_vocabulary_are_never_passed_on(llama_dir: Path) -> None:
    loaded, speculator = load(
        llama_dir, **{"speculative.method": "draft", "speculative.draft_model": str(llama_dir)}
    )
    assert speculator is not None and isinstance(speculator.proposer, DraftProposer)
    proposer = speculator.proposer
    ids = list(loaded.tokenizer(PROMPTS[0]).input_ids)
    (proposal,) = proposer.propose([(seq("a", ids), 3)])
    assert len(proposal) == 3
    proposer.target_vocab = max(proposal)  # the target cannot embed the largest proposed id
    assert proposer.propose([(seq("b", ids), 3)]) == [proposal[: proposal.index(max(proposal))]]
    proposer.draft_vocab = max(ids)  # a prompt token the draft cannot embed
    assert proposer.propose([(seq("c", ids), 3)]) == [[]]


def test_the_attention_probe_counts_no_proposal_queries(llama_dir: Path) -> None:
    loaded, speculator = load(llama_dir, **{"speculative.method": "ngram"})
    eng = engine(loaded, speculator, num_blocks=96, block_size=4)
    scheduler = scheduled_decode(eng.pool, [3, 5])
    batch = scheduler.schedule({"r1": [7, 8]})
    _, _, meta, _ = eng.runner.metadata(batch)
    assert meta.probe_positions is not None
    assert meta.query_positions[1].tolist() == [5, 6, 7]
    assert meta.probe_positions[1].tolist() == [5, -1, -1]
    assert meta.probe_positions[0].tolist() == meta.query_positions[0].tolist() == [3, -1, -1]
