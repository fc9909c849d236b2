"""WiCore stream deltas into OpenAI's response JSON, for the HTTP front (`http_api.py`).

A `Renderer` follows one request's choices as their deltas arrive: it returns each
delta's stream chunk (`chat.completion.chunk` / `text_completion`) and keeps what the
whole response needs (text, logprobs, finish reason, usage), so streaming and
non-streaming answers are built from the same records.

Usage counts each prompt once however many choices it has (as OpenAI bills `n`):
prompt and cached tokens come from the prompt's first finished choice, completion
tokens from every choice. Logprobs that JSON cannot hold (-inf) are sent as -9999.0,
as vLLM does.
"""

from __future__ import annotations

import codecs
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from wicore.gateway.openai_convert import Call
from wicore.v1 import inference_pb2

SSE_DONE = b"data: [DONE]\n\n"
MIN_LOGPROB = -9999.0
_FINISH = {inference_pb2.FINISH_REASON_STOP: "stop", inference_pb2.FINISH_REASON_LENGTH: "length"}

Json = dict[str, Any]


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON; NaN or infinity is a bug here (logprobs are clamped first)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


def safe_logprob(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB


class TokenText:
    """A token id's exact bytes and its text, cached per id. The text is the bytes as UTF-8;
    a token holding part of a multi-byte character reads `bytes:\\xe4\\xbd` (as OpenAI writes
    such tokens), its `bytes` being what joins it to its neighbours."""

    def __init__(self, token_bytes: Callable[[int], bytes], max_cached: int = 1 << 17) -> None:
        self._token_bytes = token_bytes
        self._cache: dict[int, tuple[str, bytes]] = {}
        self._max_cached = max_cached

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        found = self._cache.get(token_id)
        if found is None:
            raw = self._token_bytes(token_id)
            try:
                found = raw.decode(), raw
            except UnicodeDecodeError:
                found = "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw
            if len(self._cache) < self._max_cached:
                self._cache[token_id] = found
        return found


_SP_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def hf_token_bytes(tokenizer: Any) -> Callable[[int], bytes]:
    """A Hugging Face tokenizer's token ids as bytes: byte-level BPE (GPT-2, Llama 3, Qwen,
    SmolLM) through its byte table, SentencePiece byte fallback (`<0xE4>`) as that byte, other
    SentencePiece pieces with `▁` as a space, special tokens as they decode."""
    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder")
    byte_level = '"ByteLevel"' in json.dumps(decoder)
    table = {c: b for b, c in _gpt2_bytes_to_unicode().items()}
    special = set(tokenizer.all_special_ids)

    def token_bytes(token_id: int) -> bytes:
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if token_id in special or not isinstance(piece, str):
            return str(tokenizer.decode([token_id])).encode()
        if byte_level and all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        if match := _SP_BYTE.fullmatch(piece):
            return bytes([int(match[1], 16)])
        return piece.replace("\u2581", " ").encode()

    return token_bytes


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, which byte-level BPE vocabularies use."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _chat_entry(token: tuple[str, bytes], logprob: float) -> Json:
    return {"token": token[0], "logprob": safe_logprob(logprob), "bytes": list(token[1])}


def chat_logprobs(entries: Sequence[inference_pb2.TokenLogprob], text: TokenText) -> list[Json]:
    """Chat's `logprobs.content` items: each token, its logprob, bytes and top alternatives."""
    return [
        {
            **_chat_entry(text(e.token_id), e.logprob),
            "top_logprobs": [_chat_entry(text(t.token_id), t.logprob) for t in e.top],
        }
        for e in entries
    ]


def completion_logprobs(
    entries: Sequence[inference_pb2.TokenLogprob], text: TokenText, state: ChoiceState
) -> Json:
    """The legacy completions `logprobs` object for these tokens. `text_offset` counts the
    characters of the choice's text before each token (its bytes decoded incrementally);
    `top_logprobs` always holds the sampled token, as OpenAI's does."""
    out: Json = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        token, raw = text(e.token_id)
        top = {text(t.token_id)[0]: safe_logprob(t.logprob) for t in e.top}
        top.setdefault(token, safe_logprob(e.logprob))
        out["tokens"].append(token)
        out["token_logprobs"].append(safe_logprob(e.logprob))
        out["top_logprobs"].append(top)
        out["text_offset"].append(state.offset)
        state.offset += len(state.utf8.decode(raw))
    return out


@dataclass
class ChoiceState:
    """What one choice produced so far."""

    prompt: int
    text: list[str] = field(default_factory=list)
    chat_logprobs: list[Json] = field(default_factory=list)
    completion_logprobs: Json = field(
        default_factory=lambda: {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    )
    offset: int = 0  # characters of text before the next token (completions' text_offset)
    utf8: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )
    finish: str | None = None
    usage: inference_pb2.Usage | None = None


class Renderer:
    """The OpenAI JSON of one `Call` (chat or completions), built as its deltas arrive."""

    def __init__(self, call: Call, chat: bool, model: str, token_text: TokenText) -> None:
        self.call, self.chat, self.model, self.token_text = call, chat, model, token_text
        self.created = int(time.time())
        self.states = [ChoiceState(prompt=p) for p in call.prompt_of]
        self._object = "chat.completion" if chat else "text_completion"
        self._chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def _head(self, obj: str) -> Json:
        return {"id": self.call.response_id, "object": obj, "created": self.created, "model": self.model}

    def add(self, index: int, msg: inference_pb2.GenerateStreamResponse) -> Json | None:
        """Records choice `index`'s delta; returns its stream chunk (None when it says nothing)."""
        state = self.states[index]
        state.text.append(msg.text)
        logprobs = self._logprobs(state, msg.logprobs) if self.call.logprobs is not None else None
        finish = None
        if msg.finish_reason:
            finish = state.finish = _FINISH.get(msg.finish_reason, "stop")
            state.usage = msg.usage
        if not msg.text and not msg.logprobs and finish is None:
            return None
        return self._chunk(index, msg.text, logprobs, finish)

    def _logprobs(self, state: ChoiceState, entries: Sequence[inference_pb2.TokenLogprob]) -> Json:
        if self.chat:
            content = chat_logprobs(entries, self.token_text)
            state.chat_logprobs.extend(content)
            return {"content": content}
        piece = completion_logprobs(entries, self.token_text, state)
        for key, values in piece.items():
            state.completion_logprobs[key].extend(values)
        return piece

    def _chunk(self, index: int, text: str, logprobs: Json | None, finish: str | None) -> Json:
        if self.chat:
            delta = {"content": text} if text or logprobs else {}
            return self._chunk_with(
                {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            )
        return self._chunk_with({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})

    def _chunk_with(self, choice: Json) -> Json:
        chunk = {**self._head(self._chunk_object), "choices": [choice]}
        if self.call.include_usage:
            chunk["usage"] = None  # as OpenAI's: null on every chunk but the last
        return chunk

    def role_chunks(self) -> list[Json]:
        """Chat streams open each choice with the assistant's role (none for completions)."""
        if not self.chat:
            return []
        delta = {"role": "assistant", "content": ""}
        return [
            self._chunk_with({"index": i, "delta": delta, "logprobs": None, "finish_reason": None})
            for i in range(len(self.states))
        ]

    def usage(self) -> Json:
        prompt = cached = completion = 0
        counted: set[int] = set()
        for state in self.states:
            if state.usage is None:
                continue
            completion += state.usage.completion_tokens
            if state.prompt not in counted:
                counted.add(state.prompt)
                prompt += state.usage.prompt_tokens
                cached += state.usage.cached_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def usage_chunk(self) -> Json:
        """`stream_options.include_usage`'s last chunk: no choices, the whole request's usage."""
        return {**self._head(self._chunk_object), "choices": [], "usage": self.usage()}

    def response(self) -> Json:
        """The whole (non-streaming) response."""
        choices = [self._choice(i, s) for i, s in enumerate(self.states)]
        return {**self._head(self._object), "choices": choices, "usage": self.usage()}

    def _choice(self, index: int, state: ChoiceState) -> Json:
        text = "".join(state.text)
        wanted = self.call.logprobs is not None
        if self.chat:
            logprobs = {"content": state.chat_logprobs} if wanted else None
            message = {"role": "assistant", "content": text}
            return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": state.finish}
        logprobs = state.completion_logprobs if wanted else None
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": state.finish}
