from wicore.cli import run_service
from wicore.tier.app import serve

run_service("tier", serve)
