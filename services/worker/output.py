"""Turns token ids into text deltas, and ends requests on stop strings.

Invariants of `TextStream`:
- the deltas it returns, joined, are the final text;
- no delta ends in the middle of a UTF-8 character (text ending in U+FFFD is
  held back until the next token completes it, or the request ends);
- while a request runs, the last `len(longest stop string) - 1` characters are
  held back, so a stop string split across tokens never leaks a prefix;
- a stop string ends the request; the text stops right before it.

Decoding is incremental (as in TGI): each step decodes only the tokens from the
previous step's start (`prefix_offset`, kept as context so tokenizers that strip a
leading space do not) to the end, and appends what the new tokens added. Decoding
the whole output at every token would cost O(n^2) per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from wicore.worker.engine_types import FinishReason, RequestTimes, TokenLogprob


@dataclass(slots=True)
class Delta:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    times: RequestTimes | None = None  # on the last delta: the request's way through the engine

    def merged(self, later: Delta) -> Delta:
        """This delta and the next of the same request as one (counts are running totals)."""
        return Delta(
            text=self.text + later.text,
            token_ids=self.token_ids + later.token_ids,
            finish_reason=later.finish_reason,
            prompt_tokens=later.prompt_tokens,
            completion_tokens=later.completion_tokens,
            cached_tokens=later.cached_tokens,
            logprobs=self.logprobs + later.logprobs,
            times=later.times,
        )


@dataclass(slots=True)
class TextStream:
    tokenizer: Any
    stop: tuple[str, ...] = ()
    prompt_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # the decoded output so far (complete characters only, until the end)
    sent: str = ""
    finished: bool = False
    prefix_offset: int = 0
    read_offset: int = 0

    def push(
        self,
        new_ids: list[int],
        finish_reason: FinishReason | None,
        cached_tokens: int = 0,
        logprobs: list[TokenLogprob] | None = None,
    ) -> Delta:
        """Adds one step's tokens; returns the delta to send (possibly empty text)."""
        self.token_ids.extend(new_ids)
        self._decode_new(final=finish_reason is not None)
        text = self.text
        stop_at = self._find_stop(text)
        if stop_at is not None:
            text, finish_reason = text[:stop_at], FinishReason.STOP
        if finish_reason is None:
            visible = len(text) - max((len(s) for s in self.stop), default=1) + 1
            while visible > len(self.sent) and text[visible - 1] == "\ufffd":
                visible -= 1
            text = text[: max(visible, len(self.sent))]
        self.finished = finish_reason is not None
        delta_text = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent += delta_text
        return Delta(
            text=delta_text,
            token_ids=list(new_ids),
            finish_reason=finish_reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.token_ids),
            cached_tokens=cached_tokens,
            logprobs=logprobs or [],
        )

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def _decode_new(self, final: bool) -> None:
        before = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.token_ids[self.prefix_offset :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)

    def _find_stop(self, text: str) -> int | None:
        if not self.stop:
            return None
        start = max(0, len(self.sent) - max(len(s) for s in self.stop))
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None
