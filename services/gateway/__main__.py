from wicore.cli import run_service
from wicore.gateway.app import serve

run_service("gateway", serve)
