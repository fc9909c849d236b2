"""benchmark/throughput_test.py end to end, as the guide runs it: a subprocess that starts its own
stack (the tiny random Llama, the service tests' settings), runs a 2 x 2 grid of short cells and
the transformers baselines, and writes its table, JSON and plot; and against an address where
nothing listens, where it must stop at once with exit status 2 and name the address."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from stack import TEST_SETTINGS

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmark" / "throughput_test.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_script(*args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )


def test_a_short_grid_against_a_stack_it_starts(tmp_path: Path, tiny_llama_dir: Path, redis_url: str) -> None:
    settings = TEST_SETTINGS | {"redis.url": redis_url}
    out_json, out_png = tmp_path / "out.json", tmp_path / "out.png"
    done = run_script(
        "--model", str(tiny_llama_dir), "--batch_sizes", "1,2", "--sequence_lengths", "16,32",
        "--duration", "3", "--warmup", "0.5", "--output_len", "8",
        "--json", str(out_json), "--plot", str(out_png), "--compare", "hf",
        *(f"--set={key}={value}" for key, value in settings.items()),
        timeout_s=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert "| batch | sequence length | output tok/s | total tok/s | TTFT p50 ms |" in done.stdout
    assert "| vs HF static | vs HF CB |" in done.stdout

    report = json.loads(out_json.read_text())
    assert report["target"].startswith("grpc://127.0.0.1:") and report["params"]["duration"] == 3.0
    assert report["machine"]["cpus"] >= 1
    cells = report["cells"]
    assert [(c["batch"], c["sequence_length"]) for c in cells] == [(1, 16), (2, 16), (1, 32), (2, 32)]
    for cell in cells:
        assert cell["output_tok_s"] > 0 and cell["completed"] > 0, cell
        assert cell["errors"] == {} and cell["errors_all"] == {}, cell
        assert cell["window_s"] == 2.5
        assert cell["ttft_ms"]["p50"] > 0 and cell["itl_ms"]["p50"] > 0
        assert cell["utilisation"]["cpu"] is not None  # the stack's worker is local
        assert cell["vs_hf_static"] > 0 and cell["vs_hf_cb"] > 0, cell
        assert cell["hf"]["static"]["tok_s"] > 0 and cell["hf"]["cb"]["tok_s"] > 0
        requests = cell["records"]
        assert len(requests) == cell["requests_sent"] >= cell["completed"]
        assert all(r["output_tokens"] == 8 and r["error"] is None for r in requests)
        # the prompts are exactly the cell's length (the tokenizer may add a BOS token)
        assert all(r["prompt_tokens"] - cell["sequence_length"] in (0, 1) for r in requests)
    assert out_png.read_bytes()[:8] == PNG_MAGIC


def test_a_target_that_does_not_answer_exits_2_naming_it(tiny_llama_dir: Path) -> None:
    done = run_script(
        "--target", "127.0.0.1:1", "--model", str(tiny_llama_dir), "--duration", "3", timeout_s=60
    )
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "127.0.0.1:1" in done.stderr and "error:" in done.stderr
    assert "| batch |" not in done.stdout
