import os

# Before torch loads OpenMP: idle OpenMP threads sleep at once instead of spinning. Spinning is
# faster on cores the worker has to itself (two cores, SmolLM2, 16 x 128 -> 64 through the stack:
# 286 tok/s with libgomp's default spin against 240 passive), but collapses when another process
# wants them (17-21 tok/s against 178 passive with one busy loop at nice 19 beside the stack).
# An explicit setting wins: OMP_WAIT_POLICY, or GOMP_SPINCOUNT on a dedicated machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from wicore.cli import run_service
from wicore.worker.app import serve

run_service("worker", serve)
