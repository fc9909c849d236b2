"""Seeded benchmark prompts of real English text, sized in tokens of the served model.

The text comes from `benchmark/data/corpus.txt` (an original corpus written for this project:
about 40 passages of fiction, news, technical explanations, dialogues, recipes, lists and a
little Python, separated by lines holding only `---`; see `benchmark/data/README.md`).

How a prompt of `tokens` tokens is made, exactly:

1. Once per generator, the passages are joined with "\\n\\n" (plus a trailing "\\n\\n", so
   that wrapping from the last passage to the first is a paragraph break too) and encoded
   with the served model's tokenizer, without special tokens, into one id stream of length L.
2. Per prompt, `random.Random(seed)` (one per generator, advanced by every call) draws a
   start offset in [0, L). Offsets are not reused within a generator until all L have been
   used, so no two prompts begin at the same place (which would hand a prefix cache free
   hits between prompts of different lengths).
3. From that offset, n ids are taken, wrapping around the stream as often as needed (so
   lengths beyond L work), decoded to text, and stripped of "\\ufffd" at both ends (a slice
   may cut a multi-byte character). n starts at `tokens` minus the instruction's length.
4. The text (instruction + body) is re-encoded and measured. Decoding then re-encoding a
   slice can differ from n by a token or two at the edges, so n is moved by the difference
   (usually one id at a time) and the text remade, for at most `MAX_STEPS` tries; if that
   cycles without an exact hit, the start moves one id on (at most `MAX_SHIFTS` times).
5. The result is the first text measuring exactly `tokens`, else the longest one measured
   not above `tokens`. `Prompt.tokens` is always the measured length of `Prompt.text`
   re-encoded, never the request. For ordinary (BPE, SentencePiece) tokenizers the result
   is exact; a tokenizer for which some lengths are impossible gets the closest below.

The sequence of prompts is a pure function of (corpus, tokenizer, seed, sequence of calls):
two generators built alike give identical prompts; different seeds give different ones.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Encode = Callable[[str], list[int]]
Decode = Callable[[list[int]], str]

DEFAULT_CORPUS = Path(__file__).resolve().parent / "data" / "corpus.txt"
SEPARATOR = "---"
JOIN = "\n\n"
SUMMARISE = "Summarise the following passage:\n\n"
MAX_STEPS = 8  # length adjustments per start offset
MAX_SHIFTS = 4  # start offsets tried per prompt
REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class Prompt:
    text: str
    tokens: int  # len(encode(text)): measured, not requested


def load_corpus(path: Path = DEFAULT_CORPUS) -> list[str]:
    """The corpus's passages, stripped, in file order."""
    passages: list[str] = []
    current: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() == SEPARATOR:
            passages.append("\n".join(current).strip())
            current = []
        else:
            current.append(line)
    passages.append("\n".join(current).strip())
    return [p for p in passages if p]


def tokenizer_functions(model_dir: Path) -> tuple[Encode, Decode]:
    """The served model's tokenizer as (encode, decode), both without special tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    def decode(ids: list[int]) -> str:
        return str(tokenizer.decode(ids, skip_special_tokens=True))

    return encode, decode


class PromptGenerator:
    def __init__(self, encode: Encode, decode: Decode, seed: int, corpus: list[str] | None = None) -> None:
        passages = load_corpus() if corpus is None else corpus
        self._encode = encode
        self._decode = decode
        self._rng = random.Random(seed)
        self._ids = encode(JOIN.join(passages) + JOIN)
        if not self._ids:
            raise ValueError("the corpus encodes to no tokens")
        self._used: set[int] = set()

    @property
    def stream_length(self) -> int:
        """L: the corpus's length in tokens, after which prompts wrap around."""
        return len(self._ids)

    def prompt(self, tokens: int, instruction: str | None = None) -> Prompt:
        """A prompt of `tokens` tokens (instruction included), exact where possible."""
        if tokens < 1:
            raise ValueError(f"tokens must be at least 1, got {tokens}")
        prefix = instruction or ""
        budget = tokens - len(self._encode(prefix)) if prefix else tokens
        if budget < 0:
            raise ValueError(f"the instruction alone is longer than {tokens} tokens")
        start = self._next_start()
        best: Prompt | None = None
        for shift in range(MAX_SHIFTS):
            found = self._fit(start + shift, budget, tokens, prefix)
            if found is not None and (best is None or found.tokens > best.tokens):
                best = found
            if best is not None and best.tokens == tokens:
                break
        if best is None:  # every try came out too long: the instruction alone, or nothing
            best = Prompt(prefix, len(self._encode(prefix)))
        return best

    def prompts(self, n: int, tokens: int, instruction: str | None = None) -> list[Prompt]:
        """The next `n` prompts of `tokens` tokens each."""
        return [self.prompt(tokens, instruction) for _ in range(n)]

    def _next_start(self) -> int:
        length = len(self._ids)
        if len(self._used) >= length:
            self._used.clear()
        while True:
            start = self._rng.randrange(length)
            if start not in self._used:
                self._used.add(start)
                return start

    def _take(self, start: int, n: int) -> list[int]:
        """n ids from `start`, wrapping around the stream."""
        ids, out = self._ids, list[int]()
        pos = start % len(ids)
        while len(out) < n:
            out.extend(ids[pos : pos + n - len(out)])
            pos = 0
        return out

    def _fit(self, start: int, budget: int, tokens: int, prefix: str) -> Prompt | None:
        """The best text from `start` measuring at most `tokens`, or None if all were longer."""
        best: Prompt | None = None
        n, tried = budget, set[int]()
        for _ in range(MAX_STEPS):
            tried.add(n)
            text = prefix + self._decode(self._take(start, n)).strip(REPLACEMENT)
            got = len(self._encode(text))
            if got <= tokens and (best is None or got > best.tokens):
                best = Prompt(text, got)
            if got == tokens:
                break
            step = tokens - got
            n = max(0, n + step)
            if n in tried:  # moving by the difference cycles: try one id at a time instead
                n = max(0, n - step + (1 if step > 0 else -1))
                if n in tried:
                    break
        return best
