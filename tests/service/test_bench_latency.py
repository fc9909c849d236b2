"""benchmark/latency_test.py end to end, as a subprocess, against one real stack (`wicore up`,
loopback) serving the tiny Llama: through the gRPC API and through the OpenAI HTTP API, and the
exit status when nothing answers. Short cells (2 s of arrivals), so the numbers are checked for
shape and consistency, not for value."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stack import Stack, free_port, start_stack

SCRIPT = Path(__file__).resolve().parents[2] / "benchmark" / "latency_test.py"
SHORT = ["--duration", "2", "--prompt_len", "32", "--output_len", "8", "--drain", "30"]


@pytest.fixture(scope="module")
def http_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, redis_url: str, http_port: int
) -> Iterator[Stack]:
    s = start_stack(
        tmp_path_factory.mktemp("bench-latency"),
        str(tiny_llama_dir),
        redis_url,
        settings={"gateway.http_port": http_port},
    )
    yield s
    assert s.stop() == 0, s.log()[-3000:]


def bench(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout_s
    )


def check_cells(report: dict[str, Any], users: list[int], rates: list[float]) -> None:
    cells = report["cells"]
    assert [(c["users"], c["offered_rate"]) for c in cells] == [(u, r) for u in users for r in rates]
    for cell in cells:
        s = cell["summary"]
        assert s["errors"] == {} and s["completed"] == s["requests"] == cell["arrivals"] > 0, cell
        for key in ("ttft_ms", "itl_ms", "e2e_ms"):
            assert 0 < s[key]["p50"] <= s[key]["p95"] <= s[key]["p99"], (key, cell)
        assert s["ttft_ms"]["p50"] <= s["e2e_ms"]["p50"]
        assert s["output_tok_s"] > 0 and 0 <= s["goodput_fraction"] <= 1
        assert math.isnan(cell["achieved_rate"]) or cell["achieved_rate"] > 0
        assert cell["queue_wait_ms"]["p50"] >= 0
    assert set(report["knees"]) == {str(u) for u in users}


def test_grpc_target(stack: Stack, tiny_llama_dir: Path, tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "out.json", tmp_path / "out.png"
    run = bench(
        "--model", str(tiny_llama_dir), "--target", stack.gateway,
        "--concurrent_users", "1,4", "--request_rate", "2,8", *SHORT,
        "--json", str(out_json), "--plot", str(out_png),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out_json.read_text())
    check_cells(report, [1, 4], [2, 8])
    assert report["target"] == f"grpc://{stack.gateway}"
    assert report["params"]["concurrent_users"] == [1, 4] and report["machine"]["cpus"] >= 1
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run.stdout.startswith("| users | offered req/s | achieved req/s | TTFT p50 |")
    assert len([line for line in run.stdout.splitlines() if line.startswith("| 1 |")]) == 2
    assert "- 1 users: " in run.stdout and "- 4 users: " in run.stdout


def test_http_target(stack: Stack, tiny_llama_dir: Path, http_port: int, tmp_path: Path) -> None:
    out_json = tmp_path / "out.json"
    run = bench(
        "--model", str(tiny_llama_dir), "--http", f"http://127.0.0.1:{http_port}/v1",
        "--concurrent_users", "2", "--request_rate", "4", *SHORT, "--json", str(out_json),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out_json.read_text())
    check_cells(report, [2], [4])
    assert report["target"] == f"http://127.0.0.1:{http_port}/v1"
    assert report["cells"][0]["summary"]["output_tok_s"] > 0


def test_no_target_exits_2(tiny_llama_dir: Path) -> None:
    run = bench("--model", str(tiny_llama_dir), "--target", f"127.0.0.1:{free_port()}", *SHORT)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "no WiCore gateway answers" in run.stderr
