"""benchmark/stress_test.py end to end: it starts its own stack (`wicore up`) on a tiny Llama, ramps
four client loops up, holds, and judges the samples it took of every service."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmark" / "stress_test.py"
SERVICES = ("gateway", "scheduler", "tier", "worker-0")


def test_stress_test_passes_on_a_tiny_stack(tmp_path: Path, tiny_llama_dir: Path) -> None:
    out_json, out_png = tmp_path / "out.json", tmp_path / "out.png"
    command = [
        sys.executable, str(SCRIPT), "--model", str(tiny_llama_dir),
        "--max_concurrent", "4", "--ramp_up", "2", "--duration", "4", "--warmup", "1",
        "--sample_interval", "0.5", "--prompt_lens", "16,32", "--output_lens", "4,8",
        "--json", str(out_json), "--plot", str(out_png),
        # The scheduler's Redis connection pool grows to the peak of its concurrent Redis calls and
        # stays there (measured: +3 sockets within ~7 s with 4 loops, then flat for 30 s); a 1 s
        # warm-up is too short for that plateau, so its fds may grow by up to the loops' count.
        "--fd_growth_limit", "4",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr[-4000:]}"
    assert "verdict: PASS" in done.stdout
    for name in SERVICES:
        assert f"| {name} |" in done.stdout  # the table has a row per service

    report = json.loads(out_json.read_text())
    assert report["verdict"] == {"passed": True, "reasons": [], "notes": []}
    assert report["params"]["max_concurrent"] == 4
    assert report["params"]["prompt_lens"] == [16, 32]
    assert "cpus" in report["machine"]
    samples = report["samples"]
    assert [s["label"] for s in samples if "label" in s] == ["baseline", "end"]
    baseline = next(s for s in samples if s.get("label") == "baseline")
    assert 2.9 <= baseline["t"] <= 4.0  # ramp_up 2 + warmup 1
    assert len(samples) >= 10  # every 0.5 s over 6 s, and the end
    assert [s["t"] for s in samples] == sorted(s["t"] for s in samples)
    for sample in samples:
        for name in SERVICES:
            svc = sample["services"][name]
            assert svc["up"] and svc["pid"] > 0
            assert svc["rss_bytes"] > 0 and svc["open_fds"] > 0 and svc["threads"] > 0
        worker = sample["services"]["worker-0"]
        assert 0.0 <= worker["kv_cache_usage"] <= 1.0
        assert "cpu" in sample["services"]["tier"]["tier_used_bytes"]
    end = samples[-1]
    assert end["client"]["errors"] == {} and end["client"]["completed"] > 4
    assert end["client"]["in_flight"] == 0
    assert end["services"]["worker-0"]["running"] == 0 and end["services"]["worker-0"]["waiting"] == 0
    assert max(s["client"]["loops"] for s in samples) == 4
    summary = report["summary"]
    assert summary["completed"] == end["client"]["completed"] and summary["output_tok_s"] > 0
    assert set(report["services"]) == set(SERVICES)
    for name in ("gateway", "tier", "worker-0"):  # no pool of theirs grows: not one fd more at the end
        assert report["services"][name]["fds_growth"] <= 0, (name, report["services"][name])
    assert report["services"]["scheduler"]["fds_growth"] <= 4
    assert out_png.stat().st_size > 10_000
