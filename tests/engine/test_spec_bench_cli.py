"""spec_bench runs end to end on a tiny model (seconds): every method on every workload, the
pruned draft, the exactness check against off and the verify-cost table, in its JSON."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from bench_cli import run_benchmark

from tiny_models import save_tiny

METHODS = ("off", "ngram", "draft")
WORKLOADS = ("chat", "rewrite", "code")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("spec") / "tiny-llama")


def spec_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return run_benchmark("spec_bench.py", *args)


def test_spec_bench_reports_every_method_on_every_workload(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "spec.json"
    done = spec_bench(
        "--model", str(tiny), "--new-tokens", "6", "--runs", "1", "--batch", "2", "--draft-layers", "1",
        "--ignore-eos", "--verify-max-batch", "2", "--verify-prompt-tokens", "20", "--verify-steps", "2",
        "--verify-k", "0,1,4", "--set", "worker.kv_cache_bytes=16777216", "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    for key in ("tok_s", "itl_p50_ms", "acceptance", "speedup"):
        assert set(data[key]) == set(METHODS), key
        assert all(set(by_workload) == set(WORKLOADS) for by_workload in data[key].values()), key
    assert all(rate > 0 for by_workload in data["tok_s"].values() for rate in by_workload.values())
    assert all(ms > 0 for by_workload in data["itl_p50_ms"].values() for ms in by_workload.values())
    assert all(a is None for a in data["acceptance"]["off"].values())
    assert all(data["speedup"]["off"][w] == pytest.approx(1.0) for w in WORKLOADS)
    for method in ("ngram", "draft"):  # the random model repeats itself: something is proposed
        assert sum(run["proposed"] for w in WORKLOADS for run in data["runs"][method][w]) > 0, method
    # --ignore-eos: exactly --new-tokens for each request (3 or 4 prompts a workload, at least 2)
    assert all(run["tokens"] == 6 * run["requests"] for run in data["runs"]["draft"]["chat"])
    assert data["mismatches"] == 0
    assert data["draft"]["layers"] == 1
    assert 0 < data["draft"]["params"] < data["params"]["parameters"]["target"]
    cost = data["verify_cost"]
    assert set(cost["batches"]) == {"1", "2"}
    assert all(set(row["step_ms"]) == {"0", "1", "4"} for row in cost["batches"].values())
    assert all(set(row["cost_per_position"]) == {"1", "4"} for row in cost["batches"].values())
    assert "mismatches against off: 0" in done.stdout
    assert "cost/pos k=4" in done.stdout


def test_spec_bench_without_off_or_verify_cost(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "spec.json"
    done = spec_bench(
        "--model", str(tiny), "--new-tokens", "4", "--runs", "1", "--methods", "ngram",
        "--workloads", "code", "--no-verify-cost", "--set", "worker.kv_cache_bytes=16777216",
        "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data["tok_s"]) == {"ngram"} and set(data["tok_s"]["ngram"]) == {"code"}
    assert data["mismatches"] is None and data["verify_cost"] is None and data["draft"] is None
