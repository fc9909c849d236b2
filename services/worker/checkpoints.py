"""A model directory loaded as a causal LM, including multimodal checkpoints served from their
language model (text only: the vision tower's weights stay on disk).

`TEXT_MODELS` lists the multimodal families served this way, by `model_type`, with the text
class and how the checkpoint names its language model's weights:

    Gemma 3: Gemma3ForConditionalGeneration  ─▶  Gemma3ForCausalLM(config.text_config)
      language_model.model.X         (the Hub's layout, as transformers 5 saves)  ─▶  model.X
      model.language_model.X         (transformers 5's module names)              ─▶  model.X
      language_model.lm_head.weight  (absent when tied to the embeddings)         ─▶  lm_head.weight
      vision_tower.*, multi_modal_projector.*                                     ─▶  not loaded
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, Gemma3ForCausalLM

from wicore.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TextModel:
    """How to load the language model of a multimodal checkpoint."""

    model_class: Any  # a transformers class built from the checkpoint's `text_config`
    key_mapping: dict[str, str]  # checkpoint name (regex) -> the text class's name


TEXT_MODELS = {
    "gemma3": TextModel(
        Gemma3ForCausalLM,
        {
            r"^language_model\.model\.": "model.",
            r"^model\.language_model\.": "model.",
            r"^language_model\.lm_head\.": "lm_head.",
        },
    ),
}


def load_causal_lm(path: Path, dtype: torch.dtype) -> Any:
    """The model of `path` (on CPU), or for a family of `TEXT_MODELS` its language model."""
    config = AutoConfig.from_pretrained(path)
    text = TEXT_MODELS.get(config.model_type)
    if text is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    text_config = copy.deepcopy(config.get_text_config())
    # The multimodal model ties its LM head to the embeddings by its own (top-level) setting.
    text_config.tie_word_embeddings = getattr(config, "tie_word_embeddings", text_config.tie_word_embeddings)
    with quiet_load_report():
        model, info = text.model_class.from_pretrained(
            path, config=text_config, key_mapping=text.key_mapping, dtype=dtype, output_loading_info=True
        )
    if info["missing_keys"]:
        raise ConfigError(
            f"worker.model: the {config.model_type} checkpoint at {path} lacks weights of its language "
            f"model: {sorted(info['missing_keys'])[:5]}"
        )
    log.info(
        "serving the language model of %s (%s); %d weights of other towers not loaded",
        path,
        config.model_type,
        len(info["unexpected_keys"]),
    )
    return model


@contextlib.contextmanager
def quiet_load_report() -> Iterator[None]:
    """Silences transformers' load report for one load: it would list every vision weight as
    unexpected, and `load_causal_lm` checks what matters in it (missing weights) itself."""
    logger = logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
