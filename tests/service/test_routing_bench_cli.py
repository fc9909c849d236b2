"""routing_bench's multi-tenant ramp runs end to end through real stacks on a tiny model: every
policy, every load step, in its table and its JSON (keys as the README quotes them)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from bench_cli import run_benchmark


def routing_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return run_benchmark("routing_bench.py", *args, timeout_s=400)


def test_multitenant_ramp_reports_every_policy_at_every_step(tmp_path: Path) -> None:
    out = tmp_path / "routing.json"
    policies = ("mor", "mor_nowait", "least_loaded")
    done = routing_bench(
        "--workload", "multitenant", "--model", "tiny", "--workers", "2", "--runs", "1",
        "--tenants", "3", "--system-tokens", "40", "--user-tokens", "4", "--new-tokens", "3",
        "--rates", "20,40", "--step-requests", "5", "--policies", ",".join(policies), "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    for key in ("ttft_p50_ms", "ttft_p90_ms", "tok_s", "prefix_hit_rate"):
        assert set(data[key]) == set(policies), key
        assert all(set(steps) == {"20", "40"} for steps in data[key].values()), key
    assert all(ms > 0 for steps in data["ttft_p90_ms"].values() for ms in steps.values())
    assert all(rate > 0 for steps in data["tok_s"].values() for rate in steps.values())
    assert all(data["ttft_p90_ms"][p][s] >= data["ttft_p50_ms"][p][s] for p in policies for s in ("20", "40"))
    # the tenants' prompts were sent once each before the ramp: their prefixes are cached somewhere
    assert all(0 < rate <= 1 for steps in data["prefix_hit_rate"].values() for rate in steps.values())
    assert all(n == 0 for steps in data["errors"].values() for n in steps.values())
    settings = data["settings"]
    assert settings["mor_nowait"]["scheduler.routing_policy"] == "mor"
    assert settings["mor_nowait"]["scheduler.prefix_wait_factor"] == 0
    assert "scheduler.prefix_wait_factor" not in settings["mor"]
    assert settings["least_loaded"]["worker.kv_offload"] is False
    # 73 % of the two pools hold the three prefixes: each pool holds 3 / (0.73 * 2) of them
    pool_blocks = settings["mor"]["worker.kv_cache_bytes"] // (4 * 2 * 2 * 16 * 16 * 4)  # tiny Llama, fp32
    prefix_blocks = math.ceil(data["params"]["prefix_tokens"] / 16)
    assert pool_blocks == math.ceil(prefix_blocks / (0.73 * 2))
    assert "p90 ratio" in done.stdout and "least_loaded" in done.stdout


def test_unknown_policies_and_bad_rates_are_refused() -> None:
    done = routing_bench("--workload", "multitenant", "--policies", "mor,random")
    assert done.returncode == 2 and "unknown policies ['random']" in done.stderr
    done = routing_bench("--workload", "multitenant", "--rates", "1,0")
    assert done.returncode == 2 and "--rates" in done.stderr


@pytest.mark.parametrize("share", ["0", "1.5"])
def test_prefix_share_must_be_a_share(share: str) -> None:
    done = routing_bench("--workload", "multitenant", "--prefix-share", share)
    assert done.returncode == 2 and "--prefix-share" in done.stderr
