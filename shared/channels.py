"""Channels between WiCore's services, and the credentials on them.

Internal calls (gateway -> scheduler -> workers, workers and scheduler -> tier,
workers -> scheduler) carry one shared secret, the internal token, in the
`wicore-internal-token` metadata of every call: `internal_channel` attaches it (a
client interceptor), and the scheduler, workers and tier check it with
`hmac.compare_digest` in one server interceptor (`wicore.server.InternalTokenInterceptor`;
grpc.health.v1 stays open for probes). A caller without it gets UNAUTHENTICATED.

Why a token and not mTLS between the services: the services are started by one
launcher (`wicore up`) or one deployment, which can hand the same secret to all of
them (`internal.token` or `internal.token_file`; `wicore up` generates a random one
into the state directory, mode 0600) with nothing else to manage, whereas mTLS
needs a CA, a certificate per service and rotation before the stack can start at
all. What the token does not give is confidentiality: it and the traffic travel in
plaintext, which is fine on loopback (every internal service binds 127.0.0.1 by
default) or a private network, but not across an untrusted one. A service started
with no token configured accepts everyone, and logs a warning saying so.

The public port is the gateway's (API keys, `wicore.gateway.auth`), with optional
TLS (`gateway.tls_cert`, `gateway.tls_key`) and mTLS (`gateway.tls_client_ca`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from wicore import tracing
from wicore.config import Config, GatewayConfig, InternalConfig
from wicore.errors import ConfigError
from wicore.server import CHANNEL_OPTIONS, INTERNAL_TOKEN_KEY, ServiceServer

log = logging.getLogger(__name__)

MIN_TOKEN_CHARS = 16
TOKEN_FILE = "internal-token"  # in the state directory, written by `wicore up`
MAX_UNIX_PATH = 107  # sun_path holds 108 bytes with the terminating NUL


@dataclass(frozen=True, slots=True)
class InternalAuth:
    """The internal token, read once per process ("" = none: calls go without one)."""

    token: str = ""

    @classmethod
    def load(cls, config: InternalConfig) -> InternalAuth:
        if config.token and config.token_file:
            raise ConfigError("internal.token, internal.token_file: set one, not both")
        token, key = config.token, "internal.token"
        if config.token_file:
            key = "internal.token_file"
            try:
                token = Path(config.token_file).expanduser().read_text().strip()
            except OSError as exc:
                raise ConfigError(f"{key}: cannot read {config.token_file}: {exc.strerror}") from None
        if token and len(token) < MIN_TOKEN_CHARS:
            raise ConfigError(f"{key}: the token must be at least {MIN_TOKEN_CHARS} characters")
        if config.token_file and not token:
            raise ConfigError(f"{key}: {config.token_file} is empty")
        return cls(token)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What a call carries (for callers that add metadata per call, e.g. a sync stub)."""
        return ((INTERNAL_TOKEN_KEY, self.token),) if self.token else ()


class _AddToken:
    """Adds the internal token to a call's metadata. (A channel files each interceptor under
    the first kind it is, so there is one class per kind below.)"""

    def __init__(self, token: str) -> None:
        self._pair = (INTERNAL_TOKEN_KEY, token)

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._pair)
        return details._replace(metadata=metadata)


class _UnaryUnaryToken(_AddToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)


class _UnaryStreamToken(_AddToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)


class _StreamUnaryToken(_AddToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._with_token(details), request_iterator)


class _StreamStreamToken(_AddToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._with_token(details), request_iterator)


def internal_channel(address: str, auth: InternalAuth) -> grpc.aio.Channel:
    """The one way to open a channel to the scheduler, a worker or the tier."""
    kinds = (_UnaryUnaryToken, _UnaryStreamToken, _StreamUnaryToken, _StreamStreamToken)
    interceptors: list[grpc.aio.ClientInterceptor] = [k(auth.token) for k in kinds] if auth.token else []
    interceptors += tracing.client_interceptors()  # a span per call; its context travels as `traceparent`
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=interceptors)


def internal_server(name: str, host: str, port: int, config: Config) -> ServiceServer:
    """The server of an internal service, requiring the internal token when one is configured."""
    auth = InternalAuth.load(config.internal)
    if not auth.token:
        log.warning(
            "%s: no internal token configured (internal.token or internal.token_file): "
            "anyone who can reach %s:%d may call it",
            name,
            host,
            port,
        )
    return ServiceServer(name, host, port, config.shutdown_grace_s, internal_token=auth.token)


def write_private(path: Path, text: str) -> None:
    """Writes `text` to a file only its owner can read (mode 0600, also when it existed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)


def with_internal_token(config: Config, state: Path) -> Config:
    """`wicore up`: a fresh random token in `state`/internal-token, unless one is configured."""
    if config.internal.token or config.internal.token_file:
        InternalAuth.load(config.internal)  # a bad setting fails here, before any child starts
        return config
    path = state / TOKEN_FILE
    write_private(path, secrets.token_urlsafe(32) + "\n")
    return dataclasses.replace(config, internal=InternalConfig(token_file=str(path)))


def _read(key: str, path: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"gateway.{key}: cannot read {path}: {exc.strerror}") from None


def gateway_server_credentials(gc: GatewayConfig) -> grpc.ServerCredentials | None:
    """TLS for the public gRPC port (None: plaintext); mTLS with `tls_client_ca`."""
    if not gc.tls_cert and not gc.tls_key:
        if gc.tls_client_ca:
            raise ConfigError("gateway.tls_client_ca: needs gateway.tls_cert and gateway.tls_key")
        return None
    if not gc.tls_cert or not gc.tls_key:
        missing = "tls_key" if gc.tls_cert else "tls_cert"
        raise ConfigError(f"gateway.{missing}: TLS needs both gateway.tls_cert and gateway.tls_key")
    pair = (_read("tls_key", gc.tls_key), _read("tls_cert", gc.tls_cert))
    client_ca = _read("tls_client_ca", gc.tls_client_ca) if gc.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def gateway_health_socket(config: Config) -> str:
    """Where a TLS gateway also answers grpc.health.v1 in plaintext (a Unix socket in the
    state directory), so `wicore up` can probe it without a client certificate; "" without TLS."""
    gc = config.gateway
    if not gc.tls_cert:
        return ""
    path = str(config.state_path / f"gateway-{gc.port}.health.sock")
    if len(path.encode()) > MAX_UNIX_PATH:
        raise ConfigError(f"state_dir: {path} is too long for a Unix socket ({MAX_UNIX_PATH} bytes at most)")
    return path


def gateway_probe_address(config: Config) -> str:
    """Where `wicore up` polls the gateway's health."""
    socket = gateway_health_socket(config)
    return f"unix:{socket}" if socket else f"{config.gateway.host}:{config.gateway.port}"
