"""Running a benchmark script the way its README command does, for the benchmarks' CLI tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *args: str, timeout_s: float = 240) -> subprocess.CompletedProcess[str]:
    """`python benchmark/<script> <args>` from the repository root; its output captured as text."""
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmark" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=ROOT,
    )
