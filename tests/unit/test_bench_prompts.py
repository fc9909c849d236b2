"""The benchmark prompt generator (benchmark/prompts.py) and its corpus (benchmark/data/):
real text, exact token lengths, seeded and reproducible, wrapping past the corpus's end."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest


def _load_prompts():
    path = Path(__file__).resolve().parents[2] / "benchmark" / "prompts.py"
    spec = importlib.util.spec_from_file_location("bench_prompts", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_prompts", module)
    spec.loader.exec_module(module)
    return module


bp = _load_prompts()
SIZES = (1, 7, 128, 512, 2048)
WORD = re.compile(r"[A-Za-z]+")


def char_tokenizer():
    return (lambda text: [ord(c) for c in text]), (lambda ids: "".join(chr(i) for i in ids))


def whitespace_tokenizer():
    """Words (split on whitespace) as tokens, one shared vocabulary; decode joins with spaces."""
    vocab: dict[str, int] = {}
    words: list[str] = []

    def encode(text: str) -> list[int]:
        ids = []
        for word in text.split():
            if word not in vocab:
                vocab[word] = len(words)
                words.append(word)
            ids.append(vocab[word])
        return ids

    return encode, lambda ids: " ".join(words[i] for i in ids)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path):
    return bp.tokenizer_functions(tiny_llama_dir)


@pytest.fixture(scope="module")
def corpus_words() -> set[str]:
    return {w.lower() for w in WORD.findall(bp.DEFAULT_CORPUS.read_text(encoding="utf-8"))}


# --- the corpus ----------------------------------------------------------------------------


def test_corpus_size_and_shape() -> None:
    passages = bp.load_corpus()
    words = [len(p.split()) for p in passages]
    assert len(passages) >= 30
    assert sum(words) >= 9000
    assert all(150 <= w <= 400 for w in words), words
    assert all(p == p.strip() and bp.SEPARATOR not in p.splitlines() for p in passages)
    bp.DEFAULT_CORPUS.read_bytes().decode("utf-8")  # plain UTF-8


def test_load_corpus_splits_on_separator_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_text("one\ntwo --- three\n---\n\nfour\n---\n---\nfive\n", encoding="utf-8")
    assert bp.load_corpus(path) == ["one\ntwo --- three", "four", "five"]


# --- the tiny model's real tokenizer ------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_exact_lengths_with_tiny_tokenizer(tiny, size: int) -> None:
    encode, decode = tiny
    gen = bp.PromptGenerator(encode, decode, seed=size)
    for p in gen.prompts(20, size):
        assert p.tokens == len(encode(p.text)) == size  # exact: no tolerance needed
        assert "\ufffd" not in p.text


def test_instruction_is_inside_the_budget(tiny) -> None:
    encode, decode = tiny
    gen = bp.PromptGenerator(encode, decode, seed=0)
    for size in (40, 300):
        for p in gen.prompts(10, size, instruction=bp.SUMMARISE):
            assert p.text.startswith(bp.SUMMARISE)
            assert p.tokens == len(encode(p.text)) == size
    with pytest.raises(ValueError):
        gen.prompt(3, instruction=bp.SUMMARISE)
    with pytest.raises(ValueError):
        gen.prompt(0)


def test_seeded_determinism(tiny) -> None:
    encode, decode = tiny
    a = bp.PromptGenerator(encode, decode, seed=7).prompts(10, 128)
    b = bp.PromptGenerator(encode, decode, seed=7).prompts(10, 128)
    c = bp.PromptGenerator(encode, decode, seed=8).prompts(10, 128)
    assert a == b
    assert [p.text for p in a] != [p.text for p in c]
    assert len({p.text for p in a} & {p.text for p in c}) <= 1
    # A generator's sequence of calls is reproducible too, and calls do not repeat prompts.
    g1, g2 = (bp.PromptGenerator(encode, decode, seed=7) for _ in range(2))
    assert [g1.prompt(64), *g1.prompts(3, 512)] == [g2.prompt(64), *g2.prompts(3, 512)]
    many = bp.PromptGenerator(encode, decode, seed=1).prompts(200, 128)
    assert len({p.text for p in many}) == 200


def test_wraps_around_for_huge_lengths(tiny) -> None:
    encode, decode = tiny
    gen = bp.PromptGenerator(encode, decode, seed=3)
    size = 2 * gen.stream_length + 17
    p = gen.prompt(size)
    assert p.tokens == size == len(encode(p.text))
    passage = bp.load_corpus()[5]
    assert p.text.count(passage) >= 2  # the whole corpus, at least twice over
    assert gen.prompt(20_000).tokens == 20_000


def test_text_is_real_words(tiny, corpus_words: set[str]) -> None:
    encode, decode = tiny
    for p in bp.PromptGenerator(encode, decode, seed=11).prompts(10, 512):
        words = p.text.split()
        alphabetic = [w for w in words if WORD.fullmatch(w.strip(".,;:!?\"'()"))]
        assert len(alphabetic) / len(words) > 0.7  # prose, not symbols or ids
        found = [w for w in WORD.findall(p.text) if w.lower() in corpus_words]
        # only the two edge words may be cut; nothing else is outside the corpus
        assert len(found) >= len(WORD.findall(p.text)) - 2


# --- trivial tokenizers: exactness properties ----------------------------------------------


def test_char_tokenizer_is_exact_and_a_cyclic_slice_of_the_corpus() -> None:
    encode, decode = char_tokenizer()
    gen = bp.PromptGenerator(encode, decode, seed=5)
    stream = bp.JOIN.join(bp.load_corpus()) + bp.JOIN
    assert gen.stream_length == len(stream)
    for size in (*SIZES, len(stream) + 100):
        p = gen.prompt(size)
        assert p.tokens == len(p.text) == size
        assert p.text in stream * 3


def test_whitespace_tokenizer_is_exact() -> None:
    encode, decode = whitespace_tokenizer()
    gen = bp.PromptGenerator(encode, decode, seed=2)
    for size in (*SIZES, 30_000):
        for p in gen.prompts(3, size):
            assert p.tokens == len(encode(p.text)) == size


def test_impossible_lengths_give_the_closest_below() -> None:
    """Every character is two ids, so odd lengths cannot be hit: the result is one below."""

    def encode(text: str) -> list[int]:
        return [x for c in text for x in (ord(c), 0)]

    def decode(ids: list[int]) -> str:
        return "".join(chr(i) for i in ids if i)

    gen = bp.PromptGenerator(encode, decode, seed=0)
    for size in (7, 128, 129):
        for p in gen.prompts(5, size):
            assert p.tokens == len(encode(p.text)) == size - size % 2


def test_merging_tokenizer_is_made_exact() -> None:
    """A SentencePiece-style BPE trained on the corpus itself merges across slice edges, so a
    decoded slice often re-encodes a token longer or shorter; the generator corrects it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(bp.load_corpus(), trainers.BpeTrainer(vocab_size=4000, show_progress=False))

    def encode(text: str) -> list[int]:
        return tok.encode(text).ids

    def decode(ids: list[int]) -> str:
        return tok.decode(ids)

    ids = encode(bp.JOIN.join(bp.load_corpus()) + bp.JOIN)
    raw_misfits = sum(len(encode(decode(ids[s : s + 128]))) != 128 for s in range(0, 10_000, 50))
    assert raw_misfits > 0  # so the adjustment is really exercised here
    gen = bp.PromptGenerator(encode, decode, seed=4)
    for size in SIZES:
        for p in gen.prompts(30, size):
            assert p.tokens == len(encode(p.text)) == size
    assert gen.prompt(20_000).tokens == 20_000 > gen.stream_length
