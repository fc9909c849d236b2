"""Tiny Hugging Face models built from configs, with random weights, saved to a
directory and loaded back through the worker's real loader."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "WiCore serves language models over gRPC to clients in any language.",
    "Paged attention keeps the KV cache in fixed-size blocks.",
    "Héllo wörld, naïve café — ünïcode text, 你好世界, emoji 🙂 too.",
    "def add(a, b):\n    return a + b\n",
] * 20

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, as SmolLM2 and Qwen write it (without a default system message).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE: any text tokenizes, and multi-byte characters split across tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _common(tokenizer: PreTrainedTokenizerFast, max_context: int) -> dict[str, object]:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": max_context,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }


def _config(family: str, tokenizer: PreTrainedTokenizerFast, max_context: int, **sizes: int):  # type: ignore[no-untyped-def]
    from transformers import Gemma3TextConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = _common(tokenizer, max_context) | sizes
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":  # every layer slides over the last 8 positions
        return MistralConfig(**common, sliding_window=8)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":  # q/k norms, explicit head_dim
        return Qwen3Config(**common, head_dim=16)
    if family == "gemma3":  # local layers slide over 8 positions; every 4th layer is global
        return Gemma3TextConfig(
            **common,
            head_dim=16,
            sliding_window=8,
            layer_types=["sliding_attention"] * 3 + ["full_attention"],
            query_pre_attn_scalar=16,
        )
    raise ValueError(family)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")


def save_tiny(family: str, path: Path, seed: int = 0, max_context: int = 1024, **sizes: int) -> Path:
    """A tiny model of `family` with random weights, saved like a real checkpoint; `sizes`
    override the config's (hidden_size=512, num_hidden_layers=8, ...)."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    config = _config(family, tokenizer, max_context, **sizes)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_gemma3_multimodal(path: Path, seed: int = 0, tie_word_embeddings: bool = True) -> Path:
    """A tiny Gemma3ForConditionalGeneration (model_type gemma3: the tiny gemma3 text model plus
    a one-layer SigLIP vision tower and its projector), saved like the Hub's Gemma 3 checkpoints."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    tokenizer = build_tokenizer()
    text = _config("gemma3", tokenizer, 1024)
    vision = SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = Gemma3Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,  # 2 x 2 patches per image, pooled 1:1
        image_token_index=len(tokenizer),  # outside the vocabulary: text prompts never hold it
        boi_token_index=tokenizer.bos_token_id,
        eoi_token_index=tokenizer.eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def generate_greedy(model: Any, ids: list[int], max_new: int) -> list[int]:
    """generate()'s greedy tokens after `ids`, on the model's device: an explicit all-ones mask
    (pad-id tokens inside a prompt are not padding) and EOS not special."""
    prompt = torch.tensor([ids], device=model.device)
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=None,
    )
    return out[0, len(ids) :].tolist()


def engine_greedy(engine: Any, prompt_ids: list[list[int]], max_new: int) -> list[list[int]]:
    """The engine's greedy tokens for each prompt, all added at once; the block pool is checked
    after every step and must be whole again at the end."""
    from wicore.worker.engine_types import EngineRequest

    outputs = run_engine(engine, [EngineRequest(f"r{i}", ids, max_new) for i, ids in enumerate(prompt_ids)])
    return [[t for out in outputs[f"r{i}"] for t in out.new_token_ids] for i in range(len(prompt_ids))]


def run_engine(
    engine: Any, requests: list[Any], check: Callable[[Any], None] | None = None
) -> dict[str, list[Any]]:
    """Adds `requests` to the engine and steps it until all finish (10,000 steps at most),
    checking the block pool after every step (and `check(engine)`, if given); every block must
    be free or cached at the end. Returns each request's step outputs."""
    for r in requests:
        engine.add_request(r)
    outputs: dict[str, list[Any]] = {}
    for _ in range(10_000):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
        engine.pool.check_integrity()
        if check is not None:
            check(engine)
    assert not engine.has_unfinished()
    assert engine.pool.num_free == engine.pool.num_blocks  # everything released
    return outputs
