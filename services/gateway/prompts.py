"""The model's tokenizer at the front: prompts become token ids here, once.

Completions are encoded as the worker used to encode them (`tokenizer.encode`,
special tokens added). Chats go through the model's own chat template with the
assistant's turn opened (`add_generation_prompt`), so a conversation re-sent with
one more turn starts with the very tokens of the previous request: its prefix is
reused from the cache. Past the gateway a request travels as these ids.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from wicore.errors import InvalidRequest, NotReady

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str


class PromptTokenizer:
    """One model's tokenizer: encode, chat template, token strings."""

    def __init__(self, model_id: str, tokenizer: Any) -> None:
        self.model_id = model_id
        self.tokenizer = tokenizer
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))

    @classmethod
    def load(cls, model_id: str, path: str) -> PromptTokenizer:
        from transformers import AutoTokenizer

        started = time.monotonic()
        tokenizer = AutoTokenizer.from_pretrained(path)
        log.info("tokenizer of %s loaded from %s in %.1f s", model_id, path, time.monotonic() - started)
        return cls(model_id, tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def render_chat(self, messages: Sequence[Message]) -> list[int]:
        """The conversation as the model's template writes it, ending where the assistant speaks."""
        if not self.has_chat_template:
            raise NotReady(
                f"messages: model {self.model_id!r} has no chat template; use a completion "
                "(Generate, /v1/completions) with a prompt instead"
            )
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        try:
            ids = self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except Exception as exc:  # a template's own checks (jinja raise_exception), e.g. role order
            raise InvalidRequest("messages", f"the model's chat template refused them: {exc}") from None
        return [int(t) for t in ids]

    def tokens(self, text: str, add_special_tokens: bool) -> tuple[list[int], list[str]]:
        ids = list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        return ids, list(self.tokenizer.convert_ids_to_tokens(ids))
