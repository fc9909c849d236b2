from wicore.cli import run_service
from wicore.worker.app import serve

run_service("worker", serve)
