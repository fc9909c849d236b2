"""A multimodal Gemma 3 checkpoint (model_type gemma3, Gemma3ForConditionalGeneration: the
performance guide's Gemma-3-27B) is served from its language model's weights.

A tiny one with a vision tower is saved like the Hub's, loaded through the worker's real
loader, and must carry exactly the multimodal model's text weights (the vision tower left
on disk) and give, through the paged engine, the multimodal model's own greedy output.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, Gemma3ForConditionalGeneration

from wicore.config import load_config
from wicore.errors import ConfigError
from wicore.worker.app import LoadedModel, load_model
from wicore.worker.paged_engine import EngineConfig, PagedEngine

from tiny_models import engine_greedy, generate_greedy, save_tiny_gemma3_multimodal

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. WiCore serves language models",
    "Héllo",
    "def add(a, b):\n    return a + b\n",
    "Paged attention keeps the KV cache in fixed-size blocks.",
]
MAX_NEW = 16


def load(path: Path) -> LoadedModel:
    return load_model(load_config(None, {}, {"worker.model": str(path), "worker.cpu_kernels": "default"}))


def multimodal(path: Path) -> Gemma3ForConditionalGeneration:
    return Gemma3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """With the LM head tied to the embeddings (as Gemma 3's) and with one of its own."""
    path = tmp_path_factory.mktemp("models") / f"tiny-gemma3-vision-{request.param_index}"
    return save_tiny_gemma3_multimodal(path, tie_word_embeddings=request.param)


def text_weights(model: Gemma3ForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The multimodal model's language-model weights under the text model's names."""
    weights = {f"model.{k}": v for k, v in model.model.language_model.state_dict().items()}
    return weights | {"lm_head.weight": model.lm_head.weight}


def assert_same_text_weights(loaded: LoadedModel, reference: Gemma3ForConditionalGeneration) -> None:
    model = loaded.model
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.model_type == "gemma3_text"
    assert not [name for name, _ in model.named_parameters() if "vision" in name or "multi_modal" in name]
    state = model.state_dict()
    expected = text_weights(reference)
    assert sorted(state) == sorted(expected)
    for name, weight in expected.items():
        assert torch.equal(state[name], weight), name
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied == reference.config.tie_word_embeddings


def test_the_worker_loads_the_language_model_of_the_checkpoint(checkpoint: Path) -> None:
    assert_same_text_weights(load(checkpoint), multimodal(checkpoint))


def test_greedy_output_matches_the_multimodal_models_generate(checkpoint: Path) -> None:
    reference = multimodal(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    loaded = load(checkpoint)
    # Small blocks and a 7-token step budget: chunked prefill, several blocks per sequence.
    engine = PagedEngine(
        loaded.model, EngineConfig(num_blocks=64, block_size=4, max_num_batched_tokens=7), loaded.fingerprint
    )
    prompt_ids = [list(tokenizer(p).input_ids) for p in PROMPTS]
    produced = engine_greedy(engine, prompt_ids, MAX_NEW)
    for i, ids in enumerate(prompt_ids):
        assert produced[i] == generate_greedy(reference, ids, MAX_NEW), PROMPTS[i]


def rename_weights(path: Path, rename: dict[str, str]) -> None:
    """Rewrites the checkpoint's weight names: each key's first matching prefix is replaced."""
    file = path / "model.safetensors"
    weights = load_file(file)
    renamed = {}
    for name, tensor in weights.items():
        prefix = next((p for p in rename if name.startswith(p)), None)
        renamed[name if prefix is None else rename[prefix] + name[len(prefix) :]] = tensor
    save_file(renamed, file, metadata={"format": "pt"})


def test_transformers_5_module_names_load_too(tmp_path: Path) -> None:
    """transformers 5 saves the Hub's layout; a checkpoint under its module names loads the same."""
    path = save_tiny_gemma3_multimodal(tmp_path / "gemma3", tie_word_embeddings=False)
    reference = multimodal(path)
    rename_weights(
        path,
        {
            "language_model.model.": "model.language_model.",
            "language_model.lm_head.": "lm_head.",
            "vision_tower.": "model.vision_tower.",
            "multi_modal_projector.": "model.multi_modal_projector.",
        },
    )
    assert "model.language_model.norm.weight" in load_file(path / "model.safetensors")
    assert_same_text_weights(load(path), reference)


def test_a_checkpoint_missing_language_model_weights_is_refused(tmp_path: Path) -> None:
    path = save_tiny_gemma3_multimodal(tmp_path / "gemma3")
    weights = load_file(path / "model.safetensors")
    del weights["language_model.model.norm.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"^worker\.model: the gemma3 checkpoint at .* lacks weights"):
        load(path)
