"""How much the lossy KV codecs change SmolLM2's output, against the recomputed prefix.

    python benchmark/fidelity_bench.py [--prompts 40] [--prefix-tokens 300] [--new-tokens 64] --json OUT

For each prompt the prefix (its first `prefix-tokens` tokens) is run through the model
once; the KV of all but its last token is cut into 16-token blocks exactly as the tier
stores them ([layers, 2, 16, kv_heads, head_dim], post-RoPE keys), each full block goes
through `encode(codec, sink_tokens=4 on the sequence's first block)` + `decode`,
and a trailing partial block stays exact (the worker would recompute it). Both the
reference and every codec then run the same code from a fresh cache built from their
KV, feeding the prefix's last token:

    prefix ids  t0 ... t[P-2] | t[P-1]       continuation c1 ... c64
                 \\_ KV cache _/  fed first    greedy, 64 forward steps
                 (codec round trip per block)

  - greedy: 64 tokens per path; `identical` = share of prompts whose continuation
    equals the reference's, `first_divergence` = mean 0-based index of the first
    differing token over the continuations that differ (null when none do);
  - teacher-forced: the reference continuation is fed through both caches in one
    forward; `top1` = share of the 64 positions whose argmax agrees with the
    reference's, `kl` = mean KL(p_ref || p_codec) of the next-token distributions.

"raw" must come out exact (top-1 1.0, KL 0, all identical) or the run fails: it proves
the reference and the codec paths differ only in the cache. "bf16" is the noise floor
(near-ties make even a bf16 round trip diverge sometimes); `identical_vs_bf16` divides
by it. EOS is not special: every path generates all 64 tokens. All prompts have the
same length, so they are batched without padding, and the greedy decode runs the
reference and all codecs of a batch of prompts as one batch (rows do not interact:
the exact "raw" rows prove it on every run).

Text: real English prose available offline, deterministic. Two sources, interleaved:
the sections of the Python Language Reference that ship with CPython as
`pydoc_data.topics` (sorted by topic name) and the module docstrings of the
standard-library modules in MODULES (in that order, `inspect.getdoc`). Texts shorter
than `prefix-tokens` tokens and repeated prefixes are skipped; prompts start at the text's
beginning with no chat template. The texts depend on the Python version (recorded).

Model: SmolLM2-135M-Instruct in fp32, sdpa attention, `torch.set_num_threads(2)`.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import resolve_model_dir, write_json

from wicore.kv.codecs import Codec, codec_from_name, decode, encode

RAW = Codec.RAW.value
CODECS = (RAW, "bf16", "fp16", "q8", "q4")  # codec names, the keys of the results
BLOCK_TOKENS = 16
SINK_TOKENS = 4
MODULES = (
    "argparse", "cmd", "configparser", "copy", "csv", "doctest", "fileinput", "ftplib", "hashlib",
    "heapq", "io", "itertools", "json", "os", "pdb", "plistlib", "pyclbr", "pydoc", "re",
    "rlcompleter", "shelve", "site", "smtplib", "socket", "socketserver", "ssl", "statistics",
    "struct", "sys", "timeit", "unittest", "uuid", "wave",
)  # fmt: skip
# (codec, metric, bound, "min" | "max"); identical is compared as a share of the bf16 floor
TARGETS = (
    ("q8", "top1", 0.995, "min"),
    ("q8", "kl", 2e-4, "max"),
    ("q8", "identical_vs_bf16", 0.85, "min"),
    ("q4", "top1", 0.98, "min"),
    ("q4", "kl", 5e-3, "max"),
)


# --- prompts ---------------------------------------------------------------------------


def candidate_texts() -> list[tuple[str, str]]:
    """(name, text) pairs: Language Reference topics and module docstrings, interleaved."""
    from pydoc_data.topics import topics

    reference = [(f"topic:{name}", text) for name, text in sorted(topics.items())]
    docstrings = []
    for name in MODULES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
        docstrings.append((f"module:{name}", inspect.getdoc(module) or ""))
    mixed = []
    for i in range(max(len(reference), len(docstrings))):
        mixed += [pair[i] for pair in (reference, docstrings) if i < len(pair)]
    return mixed


def load_prompts(tokenizer: Any, count: int, prefix_tokens: int) -> tuple[list[str], torch.Tensor]:
    """The names and the first `prefix_tokens` token ids [count, prefix_tokens] of the first
    `count` texts that are long enough."""
    names: list[str] = []
    rows: list[list[int]] = []
    for name, text in candidate_texts():
        ids = tokenizer(text).input_ids[:prefix_tokens]
        if len(ids) == prefix_tokens and ids not in rows:
            names.append(name)
            rows.append(ids)
        if len(rows) == count:
            return names, torch.tensor(rows)
    raise SystemExit(f"--prompts: only {len(rows)} texts have {prefix_tokens}+ tokens, {count} asked")


# --- the cache and the codec round trip --------------------------------------------------


def prefix_kv(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """The KV cache of `ids` [batch, tokens] as one tensor [layers, 2, batch, kv_heads, tokens, head_dim]."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return torch.stack([torch.stack([layer.keys, layer.values]) for layer in out.cache.layers])


def make_cache(model: Any, kv: torch.Tensor) -> Any:
    """A fresh DynamicCache holding `kv` (prefix_kv's layout); forward passes append to it."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for layer in range(kv.shape[0]):
        cache.update(kv[layer, 0], kv[layer, 1], layer)
    return cache


def round_trip(kv: torch.Tensor, codec: str, block_tokens: int = BLOCK_TOKENS) -> torch.Tensor:
    """`kv` with every full block of every sequence encoded with `codec` and decoded back;
    a trailing partial block stays exact."""
    kv_codec = codec_from_name(codec)
    out = kv.clone()
    for row in range(kv.shape[2]):
        for start in range(0, kv.shape[4] - block_tokens + 1, block_tokens):
            span = slice(start, start + block_tokens)
            block = kv[:, :, row, :, span].permute(0, 1, 3, 2, 4).contiguous()  # [L, 2, T, H, D]
            sinks = SINK_TOKENS if start == 0 else 0
            decoded = decode(encode(block, kv_codec, sink_tokens=sinks))
            out[:, :, row, :, span] = decoded.to(kv.dtype).permute(0, 1, 3, 2, 4)
    return out


# --- the two measurements ----------------------------------------------------------------


def greedy(model: Any, kv: torch.Tensor, last: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """`new_tokens` greedy tokens [batch, new_tokens] after feeding `last` [batch, 1] on `kv`."""
    cache, token, out = make_cache(model, kv), last, []
    for _ in range(new_tokens):
        logits = model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
    return torch.cat(out, dim=1)


def teacher_logprobs(model: Any, kv: torch.Tensor, last: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities [batch, n, vocab] with `last` + `forced[:, :-1]` fed on `kv`."""
    inputs = torch.cat([last, forced[:, :-1]], dim=1)
    logits = model(input_ids=inputs, cache=make_cache(model, kv), use_cache=True).logits
    return torch.log_softmax(logits.float(), dim=-1)


@dataclass(slots=True)
class Tally:
    """Running sums for one codec over all prompts."""

    positions: int = 0
    top1_hits: int = 0
    kl_sum: float = 0.0
    sequences: int = 0
    identical: int = 0
    divergences: list[int] = field(default_factory=list)

    def add_greedy(self, ref: torch.Tensor, got: torch.Tensor) -> None:
        for ref_row, got_row in zip(ref.tolist(), got.tolist(), strict=True):
            self.sequences += 1
            diff = [i for i, (a, b) in enumerate(zip(ref_row, got_row, strict=True)) if a != b]
            if diff:
                self.divergences.append(diff[0])
            else:
                self.identical += 1

    def add_teacher(self, ref_lp: torch.Tensor, got_lp: torch.Tensor) -> None:
        self.positions += ref_lp.shape[0] * ref_lp.shape[1]
        self.top1_hits += int((ref_lp.argmax(-1) == got_lp.argmax(-1)).sum())
        kl = (ref_lp.exp() * (ref_lp - got_lp)).sum(-1, dtype=torch.float64)
        self.kl_sum += float(kl.sum())

    def result(self) -> dict[str, Any]:
        div = self.divergences
        return {
            "top1": self.top1_hits / self.positions,
            "kl": self.kl_sum / self.positions,
            "identical": self.identical / self.sequences,
            "first_divergence": sum(div) / len(div) if div else None,
        }


def measure(
    model: Any,
    prompts: torch.Tensor,
    codecs: tuple[str, ...] = CODECS,
    new_tokens: int = 64,
    batch: int = 10,
) -> dict[str, dict[str, Any]]:
    """Per codec: top1, kl, identical and first_divergence of `prompts` [n, prefix_tokens]
    (all one length) against the exact cache."""
    tallies = {codec: Tally() for codec in codecs}
    with torch.inference_mode():
        for start in range(0, prompts.shape[0], batch):
            ids = prompts[start : start + batch]
            rows, last = ids.shape[0], ids[:, -1:]
            kv = prefix_kv(model, ids[:, :-1])
            paths = [kv] + [round_trip(kv, codec) for codec in codecs]
            # one greedy batch for all paths: the decode steps, not their width, cost the time
            out = greedy(model, torch.cat(paths, dim=2), last.repeat(len(paths), 1), new_tokens)
            ref = out[:rows]
            ref_lp = teacher_logprobs(model, kv, last, ref)
            for i, codec in enumerate(codecs, start=1):
                tallies[codec].add_greedy(ref, out[i * rows : (i + 1) * rows])
                tallies[codec].add_teacher(ref_lp, teacher_logprobs(model, paths[i], last, ref))
            print(f"  prompts {start + rows}/{prompts.shape[0]}", file=sys.stderr)
    return {codec: tally.result() for codec, tally in tallies.items()}


def check_raw(results: dict[str, dict[str, Any]]) -> None:
    """RuntimeError unless the lossless "raw" round trip reproduced the reference exactly."""
    raw = results.get(RAW)
    if raw is not None and (raw["top1"] != 1.0 or raw["kl"] != 0.0 or raw["identical"] != 1.0):
        raise RuntimeError(f"raw round trip is not exact, the harness is broken: {raw}")


# --- report ------------------------------------------------------------------------------


def targets_met(results: dict[str, dict[str, Any]]) -> dict[str, bool]:
    met = {}
    for codec, metric, bound, kind in TARGETS:
        if codec in results:
            value = results[codec][metric]
            met[f"{codec}_{metric}"] = value >= bound if kind == "min" else value <= bound
    return met


def print_table(results: dict[str, dict[str, Any]]) -> None:
    print(f"\n{'codec':<8}{'top-1 %':>10}{'mean KL':>12}{'identical %':>14}{'% of bf16':>11}{'1st diff':>10}")
    for codec, r in results.items():
        floor, first = r.get("identical_vs_bf16"), r["first_divergence"]
        floor_text = "-" if floor is None else f"{100 * floor:.0f}"
        first_text = "-" if first is None else f"{first:.1f}"
        print(
            f"{codec:<8}{100 * r['top1']:>10.2f}{r['kl']:>12.2e}{100 * r['identical']:>14.1f}"
            f"{floor_text:>11}{first_text:>10}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--prefix-tokens", type=int, default=300)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=10, help="prompts per batch")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.prefix_tokens < 256 + 1 or args.prompts < 1 or args.new_tokens < 1:
        parser.error("--prefix-tokens must be >= 257, --prompts and --new-tokens >= 1")
    torch.set_num_threads(2)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    began = time.perf_counter()
    model_dir = resolve_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    names, prompts = load_prompts(tokenizer, args.prompts, args.prefix_tokens)
    results = measure(model.eval(), prompts, CODECS, args.new_tokens, args.batch)
    check_raw(results)
    for r in results.values():
        r["identical_vs_bf16"] = r["identical"] / results["bf16"]["identical"] if "bf16" in results else None
    print_table(results)
    met = targets_met(results)
    runtime = time.perf_counter() - began
    print(f"\ntargets met: {met}\nruntime {runtime:.0f} s")
    params = vars(args) | {
        "model_dir": str(model_dir),
        "cached_tokens": args.prefix_tokens - 1,
        "codec_tokens": (args.prefix_tokens - 1) // BLOCK_TOKENS * BLOCK_TOKENS,
        "block_tokens": BLOCK_TOKENS,
        "sink_tokens": SINK_TOKENS,
        "python": sys.version.split()[0],
        "torch_threads": torch.get_num_threads(),
        "runtime_s": round(runtime, 1),
        "prompt_names": names,
    }
    data = {key: {c: r[key] for c, r in results.items()} for key in next(iter(results.values()))}
    targets = {f"{c}_{m}": {"bound": b, "kind": k} for c, m, b, k in TARGETS}
    write_json(args.json, data | {"params": params, "targets": targets, "targets_met": met})


if __name__ == "__main__":
    main()
