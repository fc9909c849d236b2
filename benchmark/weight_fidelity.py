"""How much the CPU weight formats change SmolLM2's output and how fast they decode.

    python benchmark/weight_fidelity.py [--prompts 20] [--prefix-tokens 128] [--new-tokens 32] --json OUT

Each variant is the model as a worker loads it (`load_model` with the variant's
settings), against the reference: fp32 with transformers' own kernels
(`cpu_kernels: default`, bit for bit what `generate` computes):

  - `auto`:   fp32 through the kernels measured fastest at load (`cpu_kernels: auto`, the
              default: MKL or oneDNN by row count)
  - `onednn`: fp32 weights packed for oneDNN at every row count (`cpu_kernels: onednn`)
  - `bf16`:   `worker.dtype: bfloat16` (weights, activations and KV)
  - `int8`:   `worker.weight_quant: int8` (int8 weights, one scale per output channel)

Fidelity is measured as fidelity_bench measures the KV codecs, on the same prompts
(the Python Language Reference and stdlib docstrings, `prefix-tokens` each): greedy
continuations of `new-tokens` tokens, `identical` = share equal to the reference's;
teacher-forced on the reference continuation, `top1` = share of positions whose argmax
agrees and `kl` = mean KL(p_ref || p_variant). Speed, per variant, with the paged engine
in the same run: one 128 -> 64 request (batch 1) and 16 of them at once, tok/s, and the
prefill rate of one 512-token prompt.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_prompts, resolve_model_dir, write_json
from fidelity_bench import Tally, load_prompts

VARIANTS = {
    "fp32": {"worker.cpu_kernels": "default"},
    "auto": {"worker.cpu_kernels": "auto"},
    "onednn": {"worker.cpu_kernels": "onednn"},
    "bf16": {"worker.dtype": "bfloat16"},
    "int8": {"worker.weight_quant": "int8"},
}


def load(model_dir: Path, settings: dict[str, Any]) -> Any:
    from wicore.config import load_config
    from wicore.worker.app import load_model

    return load_model(load_config(None, {}, {"worker.model": str(model_dir)} | settings))


def continuation(model: Any, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
    )
    return out[:, ids.shape[1] :]


def teacher_logprobs(model: Any, ids: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """[batch, n, vocab] next-token log-probabilities at the n forced positions."""
    inputs = torch.cat([ids, forced[:, :-1]], dim=1)
    logits = model(input_ids=inputs).logits[:, ids.shape[1] - 1 :]
    return torch.log_softmax(logits.float(), dim=-1)


def engine_speed(
    loaded: Any, prompt_ids: list[list[int]], long_prompt: list[int], runs: int
) -> dict[str, float]:
    """Median tok/s of one 128 -> 64 request, of 16 at once, and of prefilling 512 tokens."""
    from engine_bench import run_engine

    from wicore.worker.paged_engine import EngineConfig, PagedEngine

    def engine() -> PagedEngine:
        return PagedEngine(
            loaded.model, EngineConfig(num_blocks=1024, max_num_batched_tokens=512), loaded.fingerprint
        )

    run_engine(engine(), prompt_ids[:2], 4, "warm")
    batch1, batch16, prefill = [], [], []
    for run in range(runs):
        batch1.append(run_engine(engine(), prompt_ids[:1], 64, f"b1-{run}").tok_s)
        batch16.append(run_engine(engine(), prompt_ids, 64, f"b16-{run}").tok_s)
        start = time.perf_counter()
        run_engine(engine(), [long_prompt], 1, f"p-{run}")
        prefill.append(len(long_prompt) / (time.perf_counter() - start))
    return {
        "batch1_tok_s": statistics.median(batch1),
        "batch16_tok_s": statistics.median(batch16),
        "prefill_tok_s": statistics.median(prefill),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--prefix-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"--variants: unknown {sorted(unknown)}; known: {', '.join(VARIANTS)}")

    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    names, prompts = load_prompts(tokenizer, args.prompts, args.prefix_tokens)
    speed_prompts = [list(tokenizer(p).input_ids) for p in make_prompts(tokenizer, 16, 128, 0)]
    long_prompt = list(tokenizer(make_prompts(tokenizer, 1, 512, 0)[0]).input_ids)

    reference = load(model_dir, VARIANTS["fp32"])
    with torch.inference_mode():
        ref_tokens = continuation(reference.model, prompts, args.new_tokens)
        ref_lp = teacher_logprobs(reference.model, prompts, ref_tokens)
    del reference

    results: dict[str, dict[str, Any]] = {}
    for name in variants:
        loaded = load(model_dir, VARIANTS[name])
        tally = Tally()
        with torch.inference_mode():
            tally.add_greedy(ref_tokens, continuation(loaded.model, prompts, args.new_tokens))
            tally.add_teacher(ref_lp, teacher_logprobs(loaded.model, prompts, ref_tokens))
            speed = engine_speed(loaded, speed_prompts, long_prompt, args.runs)
        results[name] = tally.result() | speed
        print(f"{name}: {results[name]}", file=sys.stderr)
        del loaded

    base = results.get("auto") or next(iter(results.values()))
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"\nweight formats, SmolLM2, {torch.get_num_threads()} threads ({capability})")
    print("| variant | top-1 % | mean KL | identical % | batch 1 tok/s | batch 16 tok/s | prefill tok/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {100 * r['top1']:.2f} | {r['kl']:.2e} | {100 * r['identical']:.0f} | "
            f"{r['batch1_tok_s']:.1f} ({r['batch1_tok_s'] / base['batch1_tok_s']:.2f}x) | "
            f"{r['batch16_tok_s']:.1f} ({r['batch16_tok_s'] / base['batch16_tok_s']:.2f}x) | "
            f"{r['prefill_tok_s']:.0f} ({r['prefill_tok_s'] / base['prefill_tok_s']:.2f}x) |"
        )
    params = vars(args) | {
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "prompt_names": names,
    }
    write_json(args.json, {"benchmark": "weight_fidelity", "params": params, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
