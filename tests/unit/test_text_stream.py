"""TextStream: deltas join to the text, no broken UTF-8, stop strings across tokens."""

from __future__ import annotations

import pytest

from wicore.worker.engine_types import FinishReason
from wicore.worker.output import TextStream

from tiny_models import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return build_tokenizer()


def run(tokenizer, text: str, stop: tuple[str, ...] = (), finish_at_end: bool = True):  # type: ignore[no-untyped-def]
    ids = tokenizer.encode(text, add_special_tokens=False)
    stream = TextStream(tokenizer, stop)
    deltas = []
    for i, token in enumerate(ids):
        last = i == len(ids) - 1
        deltas.append(stream.push([token], FinishReason.LENGTH if last and finish_at_end else None))
        if deltas[-1].finish_reason is not None:
            break
    return ids, deltas


def test_deltas_join_to_the_decoded_text_without_broken_characters(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = "Héllo wörld, naïve café 你好世界 🙂 done"
    ids, deltas = run(tokenizer, text)
    assert "".join(d.text for d in deltas) == text
    assert all("\ufffd" not in d.text for d in deltas)
    # Multi-byte characters really were split across tokens (else this test proves nothing).
    assert any(tokenizer.decode([t]).endswith("\ufffd") for t in ids)
    assert deltas[-1].completion_tokens == len(ids)


def test_stop_string_split_across_tokens_never_leaks(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = "The quick brown fox jumps over the lazy dog."
    ids, deltas = run(tokenizer, text, stop=("lazy dog",), finish_at_end=False)
    assert deltas[-1].finish_reason is FinishReason.STOP
    assert "".join(d.text for d in deltas) == "The quick brown fox jumps over the "
    assert not any("lazy" in d.text for d in deltas)
    stop_token_pieces = [tokenizer.decode([t]) for t in ids]
    assert "lazy dog" not in stop_token_pieces  # spans tokens


def test_earliest_of_several_stop_strings_wins(tokenizer) -> None:  # type: ignore[no-untyped-def]
    _, deltas = run(
        tokenizer, "def add(a, b):\n    return a + b\n", stop=("return", "(a"), finish_at_end=False
    )
    assert "".join(d.text for d in deltas) == "def add"
    assert deltas[-1].finish_reason is FinishReason.STOP


def test_no_stop_match_sends_everything_at_the_end(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = "The quick brown fox"
    _, deltas = run(tokenizer, text, stop=("zebra crossing",))
    assert "".join(d.text for d in deltas) == text
    assert deltas[-1].finish_reason is FinishReason.LENGTH
    # While running, the last len(stop)-1 characters were held back.
    assert len("".join(d.text for d in deltas[:-1])) <= len(text) - (len("zebra crossing") - 1)


def test_decoding_is_incremental(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Each step decodes a short window, not the whole output, and the result is the same."""
    text = "WiCore serves language models over gRPC. Héllo wörld, 你好世界 🙂. " * 20
    ids = tokenizer.encode(text, add_special_tokens=False)
    lengths: list[int] = []

    class Recording:
        def decode(self, token_ids, **kwargs):  # type: ignore[no-untyped-def]
            lengths.append(len(token_ids))
            return tokenizer.decode(token_ids, **kwargs)

    stream = TextStream(Recording())
    deltas = [stream.push([t], FinishReason.LENGTH if i == len(ids) - 1 else None) for i, t in enumerate(ids)]
    assert "".join(d.text for d in deltas) == tokenizer.decode(ids) == text
    assert len(ids) > 300 and max(lengths) <= 8
