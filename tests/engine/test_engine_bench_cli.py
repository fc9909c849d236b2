"""engine_bench and weight_fidelity run end to end on a tiny model (seconds): their JSON carries
the figures the README quotes (decode tok/s, the backend set with --set, fidelity per variant)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import save_tiny

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("bench") / "tiny-llama")


def bench(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmark" / script), *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )


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
