"""multiturn_bench runs end to end through real stacks on a tiny model, A²CR and LRU tiers
side by side (`hmt`, `hmt_lru`): returning-turn TTFT and hit tokens for each, in its JSON."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from bench_cli import run_benchmark

from tiny_models import save_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("multiturn") / "tiny-llama", max_context=4096)


def multiturn_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return run_benchmark("multiturn_bench.py", *args, timeout_s=400)


def test_hmt_under_a2cr_and_lru_tiers(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "multiturn.json"
    done = multiturn_bench(
        "--model", str(tiny), "--modes", "hmt,hmt_lru", "--conversations", "3", "--turns", "2",
        "--context-tokens", "120", "--message-tokens", "8", "--max-tokens", "4", "--kv-cache-mib", "1",
        "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data["ttft_p50_ms"]) == {"hmt", "hmt_lru"}
    assert all(ms > 0 for ms in data["ttft_p50_ms"].values())
    assert all(data["cached_tokens"][m] > 0 for m in ("hmt", "hmt_lru"))  # returning turns reused
    assert "hmt_lru" in done.stdout
    for run in data["runs"]["hmt"]:  # what the worker measured, from its /metrics
        assert run["costs"]["prefill_tokens_per_s"] > 0


def test_unknown_modes_are_refused() -> None:
    done = multiturn_bench("--modes", "hmt,hmt_random")
    assert done.returncode == 2 and "unknown modes ['hmt_random']" in done.stderr
