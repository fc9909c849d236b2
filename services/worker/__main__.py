import os

# Before torch loads OpenMP: idle OpenMP threads yield instead of spinning, so the
# worker's gRPC thread and the other services get the cores between GEMMs (measured:
# the stack's tok/s rose ~20% on 2 cores). An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from wicore.cli import run_service
from wicore.worker.app import serve

run_service("worker", serve)
