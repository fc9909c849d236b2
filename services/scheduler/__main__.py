from wicore.cli import run_service
from wicore.scheduler.app import serve

run_service("scheduler", serve)
