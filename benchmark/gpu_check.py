"""Everything a GPU check needs, in one command (under 10 minutes on one H100 or H200):

1. tests: the `cuda`-marked tests (tests/engine/test_cuda_engine.py) in a subprocess, before
   this process touches the device: greedy output of the paged engine against `generate` for
   a tiny model of each family, float32 (identical) and bf16 (agreement), and the KV pool sized
   from the device's memory. Pass, fail and skip counts.
2. throughput: real-shaped models with random weights, built on the device in the worker's
   default dtype (bf16 on a GPU) with fewer layers (--layers): Llama-3-8B (hidden 4096, 32
   heads, 8 KV heads, MLP 14336, vocab 128256) and Gemma-3-27B (hidden 5376, 32 heads, 16 KV
   heads, head_dim 128, MLP 21504, vocab 262208, 5 sliding layers to 1 global). The paged engine
   (KV pool sized as a worker sizes it) against HF static-batch `generate`, same prompts (random
   token ids), same process: tok/s, TTFT, ratio, at --batch requests and at 1.
3. bandwidth: a decode step's achieved memory bandwidth at batch 1 and --batch: the bytes it
   must read (every weight once, the embedding table only as the LM head, and each sequence's
   K/V, sliding layers within their window) over the median step time, against the device's
   copy peak (a large device-to-device copy: read + write) and its spec peak (memory clock x
   bus width x 2, as the driver reports them).

    python benchmark/gpu_check.py [--layers 8] [--batch 16] [--json OUT]
    python benchmark/gpu_check.py --cpu-only --json OUT   # CI: seconds, tiny models

--cpu-only (and any run without a CUDA device): the tests run with CUDA hidden (all skipped, and
reported so), parts 2 and 3 run on CPU with tiny models of the same two families.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json
from serving import machine, markdown_table

ROOT = Path(__file__).resolve().parents[1]
CUDA_TESTS = "tests/engine/test_cuda_engine.py"
TESTS_TIMEOUT_S = 300


@dataclass(frozen=True)
class Shape:
    """A model's shape; `window` > 0: Gemma 3's pattern of 5 sliding layers to 1 global."""

    name: str
    family: str  # llama or gemma3
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    window: int = 0


GPU_SHAPES = (
    Shape("llama-3-8b", "llama", 4096, 32, 8, 128, 14336, 128256),
    Shape("gemma-3-27b", "gemma3", 5376, 32, 16, 128, 21504, 262208, window=1024),
)
CPU_SHAPES = (
    Shape("llama-tiny", "llama", 64, 4, 2, 16, 128, 512),
    Shape("gemma3-tiny", "gemma3", 64, 4, 2, 16, 128, 512, window=16),
)


@dataclass(frozen=True)
class Workload:
    layers: int
    batch: int
    prompt_tokens: int
    new_tokens: int
    decode_steps: int
    copy_bytes: int  # of the peak-bandwidth copy


GPU_WORKLOAD = Workload(
    layers=8, batch=16, prompt_tokens=512, new_tokens=128, decode_steps=32, copy_bytes=2 << 30
)
CPU_WORKLOAD = Workload(
    layers=2, batch=4, prompt_tokens=16, new_tokens=4, decode_steps=3, copy_bytes=32 << 20
)


@dataclass(frozen=True)
class Run:
    tok_s: float
    ttft_ms: float


# --- 1. the CUDA tests ---


def run_cuda_tests(hide_cuda: bool) -> dict[str, Any]:
    """pytest -m cuda on the CUDA tests in a subprocess; counts from its JUnit XML."""
    env = os.environ | ({"CUDA_VISIBLE_DEVICES": ""} if hide_cuda else {})
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "cuda", "-p", "no:cacheprovider"]
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        started = time.perf_counter()
        try:
            proc = subprocess.run(
                [*command, f"--junitxml={xml}", CUDA_TESTS],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=TESTS_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as exc:
            return {
                "returncode": None,
                "timed_out_after_s": TESTS_TIMEOUT_S,
                "output_tail": str(exc.stdout)[-4000:],
            }
        result = junit_counts(xml) if xml.exists() else {}
    result |= {"returncode": proc.returncode, "seconds": round(time.perf_counter() - started, 1)}
    if proc.returncode != 0:
        result["output_tail"] = proc.stdout[-4000:]
    return result


def junit_counts(xml: Path) -> dict[str, Any]:
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None, f"no testsuite in {xml}"
    count = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    cases = list(suite.iter("testcase"))
    return {
        "passed": count["tests"] - count["failures"] - count["errors"] - count["skipped"],
        "failed": count["failures"] + count["errors"],
        "skipped": count["skipped"],
        "failed_tests": [
            c.get("name") for c in cases if c.find("failure") is not None or c.find("error") is not None
        ],
        "skip_reasons": sorted({s.get("message", "") for c in cases for s in c.findall("skipped")}),
    }


# --- 2. models and throughput ---


def build_model(shape: Shape, layers: int, dtype: torch.dtype, device: torch.device) -> Any:
    """`shape` with random weights, allocated on `device` directly (no hub, no host copy)."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

    common = {
        "hidden_size": shape.hidden,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "intermediate_size": shape.intermediate,
        "vocab_size": shape.vocab,
        "num_hidden_layers": layers,
        "max_position_embeddings": 8192,
    }
    if shape.family == "llama":
        config: Any = LlamaConfig(**common, tie_word_embeddings=False)
    else:
        kinds = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
        config = Gemma3TextConfig(
            **common,
            sliding_window=shape.window,
            layer_types=kinds,
            query_pre_attn_scalar=shape.hidden // shape.heads,
            tie_word_embeddings=True,
        )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator).tolist()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FirstTokenClock:
    """A transformers streamer that notes when the first generated token is computed."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.calls = 0
        self.first: float | None = None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2:  # call 1 is the prompt
            synchronize(self.device)
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def run_hf_static(model: Any, prompts: list[list[int]], new: int) -> Run:
    """One `generate` over the whole batch (the prompts have one length: no padding)."""
    device = model.device
    ids = torch.tensor(prompts, device=device)
    clock = FirstTokenClock(device)
    synchronize(device)
    start = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        streamer=clock,
    )
    synchronize(device)
    wall = time.perf_counter() - start
    assert out.shape == (len(prompts), ids.shape[1] + new), out.shape
    return Run(len(prompts) * new / wall, 1000 * ((clock.first or start + wall) - start))


def run_engine(engine: Any, prompts: list[list[int]], new: int, tag: str) -> Run:
    """All requests at once, driven to the end; TTFT is the median over requests."""
    from wicore.worker.engine_types import EngineRequest

    start = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.add_request(EngineRequest(f"{tag}-{i}", ids, new))
    first: dict[str, float] = {}
    produced = 0
    while engine.has_unfinished():
        for out in engine.step():
            first.setdefault(out.request_id, time.perf_counter())
            produced += len(out.new_token_ids)
    wall = time.perf_counter() - start
    assert produced == len(prompts) * new, produced
    return Run(produced / wall, 1000 * statistics.median(t - start for t in first.values()))


# --- 3. decode bandwidth ---


def decode_step_seconds(engine: Any, prompts: list[list[int]], steps: int, tag: str) -> list[float]:
    """Each of `steps` engine steps in which every sequence decodes one token (prefill done)."""
    from wicore.worker.engine_types import EngineRequest

    # Prefills may take several steps (a token budget), and a sequence started in the first must
    # still be decoding in the last timed step: room for as many steps more; aborted after.
    room = steps + 2 + len(prompts) + sum(map(len, prompts)) // 64
    for i, ids in enumerate(prompts):
        engine.add_request(EngineRequest(f"{tag}-{i}", ids, room))
    started: set[str] = set()
    while len(started) < len(prompts):
        started.update(out.request_id for out in engine.step())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        outputs = engine.step()  # returns sampled token ids: the device is done
        times.append(time.perf_counter() - start)
        assert len(outputs) == len(prompts), "a decode step left a sequence out"
    for i in range(len(prompts)):
        engine.abort_request(f"{tag}-{i}")
    while engine.has_unfinished():
        engine.step()
    return times


def weight_bytes(model: Any) -> int:
    """What a decode step reads of the weights: each once, as stored (a linear layer replaced by a
    CPU kernel's says how many bytes it reads: `weight_nbytes`); the input embedding only as the LM
    head (tied) or not at all (a few rows)."""
    embedding = model.get_input_embeddings()
    total = 0
    for module in model.modules():
        if module is embedding:
            continue
        stored = getattr(module, "weight_nbytes", None)
        if isinstance(stored, int):
            total += stored
        else:
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    return total


def kv_bytes(model: Any, context: int) -> int:
    """The K/V one sequence's decode step reads at `context` tokens; sliding layers read their window."""
    cfg = model.config
    per_token = 2 * cfg.num_key_value_heads * cfg.head_dim * model.dtype.itemsize
    kinds = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None) or context
    return sum(per_token * (min(context, window) if k == "sliding_attention" else context) for k in kinds)


def step_bytes(model: Any, batch: int, prompt_tokens: int, steps: int) -> float:
    """Bytes one decode step reads, averaged over the `steps` steps after the first token: step k
    (from 0) reads the weights and, per sequence, the K/V of prompt + 1 + k tokens."""
    contexts = [prompt_tokens + 1 + k for k in range(steps)]
    return weight_bytes(model) + batch * statistics.mean(kv_bytes(model, c) for c in contexts)


def decode_bandwidth(
    model: Any, step_seconds: list[float], batch: int, prompt_tokens: int, peak: dict[str, Any]
) -> dict[str, Any]:
    """Bytes a decode step must read over its median time, and that as a share of each peak."""
    read = step_bytes(model, batch, prompt_tokens, len(step_seconds))
    step = statistics.median(step_seconds)
    gb_s = read / step / 1e9
    return {
        "step_ms": 1000 * step,
        "bytes_read": int(read),
        "gb_s": gb_s,
        "of_copy_peak": gb_s / peak["copy_gb_s"],
        "of_spec_peak": gb_s / peak["spec_gb_s"] if peak["spec_gb_s"] else None,
    }


def copy_peak(device: torch.device, nbytes: int, reps: int = 20) -> float:
    """GB/s of a large device-to-device copy, counting the read and the write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    synchronize(device)
    seconds = time.perf_counter() - start
    del src, dst
    return 2 * nbytes * reps / seconds / 1e9


def spec_peak(device: torch.device) -> float | None:
    """GB/s the memory's clock and bus width allow (double data rate), as the driver reports them."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz, width_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if not (clock_khz and width_bits):  # newer CUDA dropped the clock from its properties: ask NVML
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{props.uuid}")
            clock_khz = 1000 * pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
            width_bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
        except Exception:  # no NVML, or it does not know: the spec peak stays unknown
            return None
    return clock_khz * 1e3 * 2 * width_bits / 8 / 1e9


# --- one model, all parts ---


def worker_config(args: argparse.Namespace, device: torch.device) -> Any:
    """The worker's config for `device`, as `wicore worker` would load it."""
    from wicore.config import load_config

    overrides: dict[str, Any] = {
        "worker.device": "cpu" if device.type == "cpu" else f"gpu:{device.index or 0}"
    }
    if args.max_batched_tokens:
        overrides["worker.max_num_batched_tokens"] = args.max_batched_tokens
    if device.type == "cpu":
        overrides["worker.kv_cache_bytes"] = 64 << 20  # tiny models: a small pool allocates fast
    return load_config(None, {}, overrides)


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_model(shape: Shape, work: Workload, config: Any, peak: dict[str, Any]) -> dict[str, Any]:
    """HF static batches, then the paged engine (its pool sized from what is left), on one model."""
    from wicore.kv.codecs import DTYPES
    from wicore.worker.app import engine_config, model_dtype, torch_device
    from wicore.worker.paged_engine import PagedEngine

    device = torch_device(config.worker.device)
    dtype = DTYPES[model_dtype(config, device)]  # auto: bf16 on a GPU, float32 on CPU
    print(f"{shape.name}: {work.layers} layers, {dtype}, on {device}", file=sys.stderr)
    model = build_model(shape, work.layers, dtype, device)
    batches = sorted({work.batch, 1}, reverse=True)
    prompts = {b: random_prompts(b, work.prompt_tokens, shape.vocab, seed=b) for b in batches}
    run_hf_static(model, random_prompts(2, 16, shape.vocab, seed=99), 2)  # warm-up
    hf = {b: run_hf_static(model, prompts[b], work.new_tokens) for b in batches}
    free_device_memory(device)

    engine = PagedEngine(model, engine_config(config, model), "gpu-check")  # sized as a worker does
    run_engine(engine, random_prompts(2, 16, shape.vocab, seed=98), 4, "warm")
    throughput = {}
    for b in batches:
        ours = run_engine(engine, prompts[b], work.new_tokens, f"b{b}")
        throughput[f"batch_{b}"] = {
            "wicore_engine": ours,
            "hf_static_batch": hf[b],
            "ratio": ours.tok_s / hf[b].tok_s,
        }
    decode = {}
    for b in batches:
        fresh = random_prompts(b, work.prompt_tokens, shape.vocab, seed=1000 + b)
        seconds = decode_step_seconds(engine, fresh, work.decode_steps, f"decode{b}")
        decode[f"batch_{b}"] = decode_bandwidth(model, seconds, b, work.prompt_tokens, peak)
    summary = {
        "layers": work.layers,
        "dtype": str(dtype).removeprefix("torch."),
        "params_b": sum(p.numel() for p in model.parameters()) / 1e9,
        "kv_pool": {"blocks": engine.pool.num_blocks, "gib": engine.runner.pool.nbytes / 2**30},
        "throughput": throughput,
        "decode": decode,
    }
    del engine, model
    free_device_memory(device)
    return summary


# --- report ---

THROUGHPUT_HEADERS = (
    "model",
    "requests",
    "wicore tok/s",
    "hf tok/s",
    "ratio",
    "wicore TTFT ms",
    "hf TTFT ms",
)
DECODE_HEADERS = ("model", "decode", "step ms", "GB read", "GB/s", "of copy peak", "of spec peak")


def print_report(data: dict[str, Any]) -> None:
    tests, peak = data["tests"], data["bandwidth_peak"]
    print(f"\n## gpu_check on {data['device']['name']} ({data['mode']}), torch {data['device']['torch']}\n")
    if "passed" in tests:
        reasons = f" ({', '.join(tests['skip_reasons'])})" if tests["skip_reasons"] else ""
        counts = f"{tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped"
        print(f"CUDA tests: {counts}{reasons}")
    elif tests.get("skipped_by_flag"):
        print("CUDA tests: not run (--skip-tests)")
    else:
        print(f"CUDA tests: did not report (exit status {tests.get('returncode')})")
    spec = f"{peak['spec_gb_s']:.1f} GB/s" if peak["spec_gb_s"] else "unknown"
    print(f"\nmemory bandwidth peak: copy {peak['copy_gb_s']:.1f} GB/s, spec {spec}\n")
    rows, decode_rows = [], []
    for name, model in data["models"].items():
        for batch, r in model["throughput"].items():
            engine, hf = r["wicore_engine"], r["hf_static_batch"]
            rows.append([name, batch, engine.tok_s, hf.tok_s, r["ratio"], engine.ttft_ms, hf.ttft_ms])
        for batch, d in model["decode"].items():
            gb = d["bytes_read"] / 1e9
            decode_rows.append(
                [name, batch, d["step_ms"], gb, d["gb_s"], d["of_copy_peak"], d["of_spec_peak"]]
            )
    print(markdown_table(THROUGHPUT_HEADERS, rows) + "\n")
    print(markdown_table(DECODE_HEADERS, decode_rows))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu-only", action="store_true", help="tiny models on CPU; CUDA tests skipped")
    parser.add_argument("--layers", type=int, help=f"layers of each model (default {GPU_WORKLOAD.layers})")
    parser.add_argument("--batch", type=int, help=f"requests at once (default {GPU_WORKLOAD.batch})")
    parser.add_argument("--prompt-tokens", type=int)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--decode-steps", type=int)
    parser.add_argument("--max-batched-tokens", type=int, help="worker.max_num_batched_tokens (default: its)")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.cpu_only
    defaults = GPU_WORKLOAD if cuda else CPU_WORKLOAD
    work = Workload(
        **{k: getattr(args, k, None) or getattr(defaults, k) for k in Workload.__dataclass_fields__}
    )
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(1)  # tiny models: their ops are too small to split between threads

    tests = {"skipped_by_flag": True} if args.skip_tests else run_cuda_tests(hide_cuda=not cuda)
    print(f"CUDA tests: {tests}", file=sys.stderr)
    peak = {"copy_gb_s": copy_peak(device, work.copy_bytes), "spec_gb_s": spec_peak(device)}
    config = worker_config(args, device)
    models = {s.name: check_model(s, work, config, peak) for s in (GPU_SHAPES if cuda else CPU_SHAPES)}
    name = torch.cuda.get_device_name(device) if cuda else machine().get("cpu", "cpu")
    info = {"name": name, "torch": torch.__version__, "cuda": torch.version.cuda, "machine": machine()}
    if cuda:
        info["total_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    data = {
        "mode": "cuda" if cuda else "cpu",
        "device": info,
        "workload": work,
        "tests": tests,
        "bandwidth_peak": peak,
        "models": models,
    }
    print_report(data)
    write_json(args.json, data)
    return 0 if args.skip_tests or (tests.get("returncode") == 0 and not tests.get("failed")) else 1


if __name__ == "__main__":
    sys.exit(main())
