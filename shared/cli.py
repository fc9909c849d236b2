"""The `wicore` command: run one service, all of them (`up`), or a client.

wicore up [--model PATH] [--port 50051] [--workers N] ...   everything, locally
wicore gateway|scheduler|worker|tier [--config F] [--set section.key=value]...   (python -m wicore.NAME)
wicore generate "prompt" [--addr 127.0.0.1:50051] [--max-tokens N] [--raw] [--tls-ca FILE]
wicore keygen [--tenant NAME]                                 a new API key and its digest
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import yaml

from wicore.api_keys import key_digest, new_key
from wicore.child import die_with_parent
from wicore.config import Config, config_from_environ
from wicore.errors import ConfigError
from wicore.logs import setup_logging
from wicore.tracing import setup_tracing, shutdown_tracing

# Each service runs from its own entry point (its package's `__main__`, which hands its
# `serve` to `run_service`): shared code names the services here but never imports one.
SERVICES = {
    "gateway": "wicore.gateway",
    "scheduler": "wicore.scheduler",
    "worker": "wicore.worker",
    "tier": "wicore.tier",
}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting (repeatable), e.g. --set worker.max_batch_size=8",
    )
    parser.add_argument("--state-dir", help="where runtime state lives (default ~/.wicore)")
    parser.add_argument("--redis-url", help="Redis URL, e.g. redis://127.0.0.1:6379/0 or unix:///path.sock")


def _service_flags(parser: argparse.ArgumentParser, name: str) -> None:
    _common(parser)
    parser.add_argument("--port", type=int, help=f"port of the {name} service")
    if name == "worker":
        parser.add_argument("--model", help="'smollm2' (default) or a local Hugging Face model directory")
        parser.add_argument("--device", help="cpu or gpu:N")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wicore", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start Redis (if none answers) and every service, locally")
    _common(up)
    up.add_argument("--port", type=int, help="public API port (default 50051)")
    up.add_argument("--model", help="'smollm2' (default) or a local Hugging Face model directory")
    up.add_argument(
        "--device",
        help="worker devices, taken in turn: cpu, gpu:0, ... or auto (every GPU plus one CPU worker)",
    )
    up.add_argument(
        "--workers", type=int, default=1, help="number of worker processes (default 1), e.g. --workers 3"
    )

    for name in SERVICES:
        _service_flags(sub.add_parser(name, help=f"run the {name} service"), name)

    gen = sub.add_parser("generate", help="stream a completion from a running gateway")
    gen.add_argument("prompt")
    gen.add_argument("--addr", default="127.0.0.1:50051")
    gen.add_argument("--model", default="")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--api-key", default="")
    gen.add_argument("--tls-ca", default="", help="talk TLS, trusting this PEM CA bundle")
    gen.add_argument(
        "--tls-cert", default="", help="client certificate (PEM) for a gateway that requires one"
    )
    gen.add_argument("--tls-key", default="", help="the client certificate's private key (PEM)")
    gen.add_argument(
        "--raw", action="store_true", help="complete the prompt text as is, without the chat template"
    )

    keygen = sub.add_parser("keygen", help="print a new API key, its SHA-256 and the config line for it")
    keygen.add_argument(
        "--tenant", default="default", help="the tenant the key belongs to (default: default)"
    )
    return parser


def keygen(tenant: str) -> str:
    """A new key, its digest and the `gateway.api_keys` entry (digest only) to paste."""
    key = new_key()
    digest = key_digest(key)
    return (
        f"key:    {key}\n"
        f"sha256: {digest}\n"
        "# paste under gateway.api_keys (or api_keys in gateway.api_keys_file);\n"
        "# the key itself goes to the client only\n"
        f'  - {{sha256: "{digest}", tenant: {json.dumps(tenant)}}}\n'
    )


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        overrides[key] = yaml.safe_load(value) if value else ""
    if args.state_dir:
        overrides["state_dir"] = args.state_dir
    if args.redis_url:
        overrides["redis.url"] = args.redis_url
    section = "gateway" if args.command == "up" else args.command
    if getattr(args, "port", None) is not None:
        overrides[f"{section}.port"] = args.port
    if getattr(args, "model", None):
        overrides["worker.model"] = args.model
    if getattr(args, "device", None) and args.command == "worker":
        overrides["worker.device"] = args.device
    return overrides


def load(args: argparse.Namespace) -> Config:
    return config_from_environ(args.config, overrides_from_args(args))


@contextlib.contextmanager
def _exit_status() -> Iterator[None]:
    """A configuration error exits with 2, saying what is wrong; Ctrl-C exits with 130."""
    try:
        yield
    except ConfigError as exc:
        print(f"wicore: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def instance_id(config: Config, name: str) -> str:
    """This process among its service's others (traces' `service.instance.id`): the worker's
    advertised address, else host:port, with this machine's name (a pod's, on Kubernetes)
    for a wildcard host, which every replica shares."""
    section = getattr(config, name)
    if name == "worker" and config.worker.advertise_address:
        return config.worker.advertise_address
    host = socket.gethostname() if section.host in ("0.0.0.0", "::", "") else section.host
    return f"{host}:{section.port}"


def run_service(name: str, serve: Callable[[Config], Coroutine[Any, Any, None]]) -> None:
    """A service's entry point (`python -m wicore.NAME`): its flags, logging, then `serve(config)`.
    The service passes its own `serve`: shared code never imports a service."""
    die_with_parent()  # a child of `wicore up` ends with it
    parser = argparse.ArgumentParser(prog=f"wicore {name}", description=f"run the {name} service")
    _service_flags(parser, name)
    parser.set_defaults(command=name)
    args = parser.parse_args()
    with _exit_status():
        config = load(args)
        setup_logging(name, config.log_level, config.observability.log_format)
        setup_tracing(name, config.observability, instance=instance_id(config, name))
        try:
            asyncio.run(serve(config))
        finally:
            shutdown_tracing()


def main() -> None:
    argv = sys.argv[1:]
    if argv and argv[0] in SERVICES:
        # This process becomes the service's own entry point (same pid, so a caller
        # that signals or waits on it still reaches the service).
        os.execv(sys.executable, [sys.executable, "-m", SERVICES[argv[0]], *argv[1:]])
    die_with_parent()  # a child of `wicore up` ends with it
    args = build_parser().parse_args(argv)
    with _exit_status():
        if args.command == "keygen":
            sys.stdout.write(keygen(args.tenant))
            return
        if args.command == "generate":
            from wicore.client import generate_to_terminal

            sys.exit(asyncio.run(generate_to_terminal(args)))
        config = load(args)
        if args.command == "up":
            from wicore.launcher import run_up

            sys.exit(run_up(config, workers=args.workers, devices=args.device))
