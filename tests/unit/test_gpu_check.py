"""benchmark/gpu_check.py --cpu-only, as CI runs it: the CUDA tests reported as skipped (with the
reason), throughput and decode bandwidth measured on tiny models on CPU, the JSON complete."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_cpu_only_gpu_check_reports_every_part(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, "benchmark/gpu_check.py", "--cpu-only", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data) == {"mode", "device", "workload", "tests", "bandwidth_peak", "models"}
    assert data["mode"] == "cpu"
    tests = data["tests"]
    assert tests["passed"] == tests["failed"] == 0 and tests["skipped"] > 0
    assert tests["skip_reasons"] == ["needs a CUDA device"]
    assert data["bandwidth_peak"]["copy_gb_s"] > 0 and data["bandwidth_peak"]["spec_gb_s"] is None
    assert set(data["models"]) == {"llama-tiny", "gemma3-tiny"}
    for model in data["models"].values():
        assert model["dtype"] == "float32" and model["kv_pool"]["blocks"] > 0
        assert set(model["throughput"]) == set(model["decode"]) == {"batch_4", "batch_1"}
        for runs in model["throughput"].values():
            for mode in ("wicore_engine", "hf_static_batch"):
                assert runs[mode]["tok_s"] > 0 and runs[mode]["ttft_ms"] > 0
            assert runs["ratio"] > 0
        for step in model["decode"].values():
            assert step["step_ms"] > 0 and step["bytes_read"] > 0 and step["gb_s"] > 0
            assert step["of_copy_peak"] > 0 and step["of_spec_peak"] is None
    assert "| llama-tiny | batch_4 |" in proc.stdout  # the markdown table
