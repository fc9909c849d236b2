"""engine_bench and weight_fidelity run end to end on a tiny model (seconds): their JSON carries
the figures the README quotes (decode tok/s, the backend set with --set, fidelity per variant)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bench_cli import run_benchmark

from tiny_models import save_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("bench") / "tiny-llama")


def bench(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_benchmark(script, *args)


@pytest.mark.parametrize("backend", ["cascade", "gather"])
def test_engine_bench_reports_decode_rates_with_a_shared_prefix(
    tiny: Path, tmp_path: Path, backend: str
) -> None:
    out = tmp_path / "engine.json"
    done = bench(
        "engine_bench.py", "--model", str(tiny), "--requests", "3", "--prompt-tokens", "8",
        "--new-tokens", "6", "--shared-prefix-tokens", "40", "--runs", "1",
        "--modes", "wicore_engine,hf_static_batch", "--set", f"worker.attention_backend={backend}",
        "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data["decode_tok_s"]) == {"wicore_engine", "hf_static_batch"}
    assert all(rate > 0 for rate in data["decode_tok_s"].values())
    assert data["runs"]["wicore_engine"][0]["extra"]["tokens"] == 3 * 6
    assert data["params"]["set"] == [f"worker.attention_backend={backend}"]
    assert "decode tok/s" in done.stdout


def test_engine_bench_refuses_a_bad_setting(tiny: Path) -> None:
    done = bench(
        "engine_bench.py", "--model", str(tiny), "--requests", "1", "--runs", "1",
        "--modes", "wicore_engine", "--set", "worker.attention_backend=flash",
    )  # fmt: skip
    assert done.returncode != 0
    assert "worker.attention_backend" in done.stderr


def test_decode_bandwidth_counts_every_weight_once_and_each_sequences_kv(tiny: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bandwidth.json"
    done = bench(
        "decode_bandwidth.py", "--model", str(tiny), "--batches", "1,3", "--prompt-tokens", "12",
        "--steps", "3", "--runs", "1", "--peak-mib", "16", "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["peak"]["read_gb_s"] > 0 and data["peak"]["copy_gb_s"] > 0
    model = AutoModelForCausalLM.from_pretrained(tiny)
    cfg = model.config
    weights = sum(p.numel() * 4 for p in model.parameters())  # tied: the embedding once, as the LM head
    if not cfg.tie_word_embeddings:
        weights -= model.get_input_embeddings().weight.numel() * 4
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 4
    for batch in (1, 3):
        prompt = data["params"]["prompt_tokens_exact"][str(batch)]
        kv = per_token * (prompt + 1 + (prompt + 3)) / 2  # contexts prompt+1 .. prompt+3
        for mode in ("wicore_engine", "hf_generate"):
            row = data["results"][f"batch_{batch}"][mode]
            assert row["bytes_read"] == int(weights + batch * kv), (batch, mode)
            assert row["step_ms"] > 0 and row["gb_s"] > 0
    assert "of read peak" in done.stdout


FAKE_LLAMA_BENCH = """#!{python}
import json, sys
args = sys.argv[1:]
if "--crash" in args:
    import os, signal
    os.kill(os.getpid(), signal.SIGILL)
p, n = int(args[args.index("-p") + 1]), int(args[args.index("-n") + 1])
assert args[args.index("-pg") + 1] == f"{{p}},{{n}}" and args[args.index("-t") + 1] == "{threads}"
def test(prompt, gen, seconds):
    return {{"n_prompt": prompt, "n_gen": gen, "samples_ns": [int(seconds * 1e9)] * 3,
             "samples_ts": [(prompt + gen) / seconds] * 3}}
print(json.dumps([test(p, 0, 0.5), test(0, n, 2.0), test(p, n, 3.0)]))
"""


def test_llamacpp_compare_pairs_each_precision_and_reports_a_failing_llama_bench(
    tiny: Path, tmp_path: Path
) -> None:
    import torch

    fake = tmp_path / "llama-bench"
    fake.write_text(FAKE_LLAMA_BENCH.format(python=sys.executable, threads=torch.get_num_threads()))
    fake.chmod(0o755)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")  # never read: the stand-in for llama-bench ignores it
    out = tmp_path / "compare.json"
    common = ("--llama-bench", str(fake), "--model", str(tiny), "--prompt-tokens", "10")
    done = bench(
        "llamacpp_compare.py", *common, "--new-tokens", "6", "--runs", "1",
        "--gguf", f"f32={gguf}", "--gguf", f"q8_0={gguf}", "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"f32", "q8_0"}
    theirs = results["f32"]["llama_cpp"]
    assert theirs["prefill_tok_s"] == pytest.approx(10 / 0.5)
    assert theirs["decode_tok_s"] == pytest.approx(6 / 2.0)
    assert theirs["request_tok_s"] == pytest.approx(6 / 3.0)
    ours = results["q8_0"]["wicore_engine"]
    assert all(rate > 0 for rate in ours.values())
    assert results["q8_0"]["ratio"]["decode_tok_s"] == pytest.approx(ours["decode_tok_s"] / 3.0)

    crashed = bench(
        "llamacpp_compare.py", *common, "--runs", "1", "--gguf", f"f32={gguf}", "--llama-bench-args=--crash"
    )
    assert crashed.returncode != 0
    assert "signal 4" in crashed.stderr


def test_prefix_attention_times_the_native_kernel_and_torchs_on_the_same_prefix(tmp_path: Path) -> None:
    out = tmp_path / "prefix.json"
    done = bench(
        "prefix_attention.py", "--prefix-tokens", "40,100", "--sequences", "3", "--heads", "4",
        "--kv-heads", "2", "--head-dim", "16", "--layers", "2", "--runs", "1", "--scattered",
        "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert [r["prefix_tokens"] for r in results] == [48, 112]  # whole blocks of 16
    for r in results:
        assert r["native_s"] > 0 and r["torch_s"] > 0
        assert r["ratio"] == pytest.approx(r["torch_s"] / r["native_s"])
        assert r["max_abs_difference"] < 1e-4  # the two agree
    assert "torch/native" in done.stdout
