"""Internal token (client interceptor, server interceptor, token loading) and the gateway's
TLS, on in-process servers: every kind of call, with and without credentials."""

from __future__ import annotations

import dataclasses
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from wicore.channels import (
    InternalAuth,
    gateway_health_socket,
    gateway_probe_address,
    gateway_server_credentials,
    internal_channel,
    internal_server,
    with_internal_token,
)
from wicore.client import open_channel
from wicore.config import Config, GatewayConfig, InternalConfig, load_config
from wicore.errors import ConfigError
from wicore.server import ServiceServer, wait_for_serving

from certs import Authority, Pem
from stack import free_port

TOKEN = "internal-token-for-tests-0123456789"
SERVICE = "test.Echo"


async def _unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _server_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for _ in range(3):
        yield request


async def _client_stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    return b"".join([r async for r in requests])


async def _bidi(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for r in requests:
        yield r


def _add_echo(_: object, server: grpc.aio.Server) -> None:
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(_server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(_client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(_bidi),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


async def started(server: ServiceServer) -> ServiceServer:
    server.add(_add_echo, None, SERVICE)
    await server.start()
    await server.set_serving(True)
    return server


async def every_kind(channel: grpc.aio.Channel) -> list[Any]:
    """One call of each kind WiCore's services have; the status code of each that failed."""
    calls = [
        lambda: channel.unary_unary(f"/{SERVICE}/Unary")(b"a", timeout=5),
        lambda: _joined(channel.unary_stream(f"/{SERVICE}/ServerStream")(b"b", timeout=5)),
        lambda: channel.stream_unary(f"/{SERVICE}/ClientStream")(iter([b"c", b"d"]), timeout=5),
    ]
    return [await _outcome(call) for call in calls]


async def bidi(channel: grpc.aio.Channel, requests: list[bytes]) -> Any:
    """A bidi call (none in WiCore yet). Refusals are tested with no requests: a server that ends
    the call while grpc still writes them now and then turns into INTERNAL on the client."""
    return await _outcome(
        lambda: _joined(channel.stream_stream(f"/{SERVICE}/Bidi")(iter(requests), timeout=5))
    )


async def _outcome(call: Any) -> Any:
    try:
        return await call()
    except grpc.aio.AioRpcError as exc:
        return exc.code()


async def _joined(call: Any) -> bytes:
    return b"".join([m async for m in call])


async def health(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(reply.status)


SERVING = health_pb2.HealthCheckResponse.SERVING
OK = [b"a", b"bbb", b"cd"]
REFUSED = [grpc.StatusCode.UNAUTHENTICATED] * 3
UNAVAILABLE = [grpc.StatusCode.UNAVAILABLE] * 3


async def test_an_internal_service_refuses_callers_without_the_token() -> None:
    config = load_config(None, {}, {"internal.token": TOKEN})
    port = free_port()
    server = await started(internal_server("scheduler", "127.0.0.1", port, config))
    address = f"127.0.0.1:{port}"
    try:
        async with internal_channel(address, InternalAuth(TOKEN)) as channel:
            assert await every_kind(channel) == OK
            assert await bidi(channel, [b"e", b"f"]) == b"ef"
        async with grpc.aio.insecure_channel(address) as channel:
            assert await every_kind(channel) == REFUSED
            assert await bidi(channel, []) == grpc.StatusCode.UNAUTHENTICATED
            assert await health(channel) == SERVING  # probes need no token
        async with internal_channel(address, InternalAuth(TOKEN[:-1] + "x")) as channel:
            assert await every_kind(channel) == REFUSED
            assert await bidi(channel, []) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await server.server.stop(0)


async def test_without_a_token_an_internal_service_lets_everyone_in_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    server = await started(internal_server("tier", "127.0.0.1", port, Config()))
    try:
        async with internal_channel(f"127.0.0.1:{port}", InternalAuth(TOKEN)) as channel:
            assert await every_kind(channel) == OK
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await every_kind(channel) == OK
    finally:
        await server.server.stop(0)
    assert "tier: no internal token configured" in caplog.text


def test_the_token_is_read_once_from_config_or_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"{TOKEN}\n")
    assert InternalAuth.load(InternalConfig(token=TOKEN)).token == TOKEN
    assert InternalAuth.load(InternalConfig(token_file=str(path))).token == TOKEN
    assert InternalAuth.load(InternalConfig()).metadata == ()
    path.write_text("\n")
    bad = [
        (InternalConfig(token=TOKEN, token_file=str(path)), "internal.token, internal.token_file: set one"),
        (InternalConfig(token="short"), "internal.token: the token must be at least 16"),
        (InternalConfig(token_file=str(path)), "internal.token_file: .* is empty"),
        (InternalConfig(token_file=str(tmp_path / "none")), "internal.token_file: cannot read"),
    ]
    for internal, message in bad:
        with pytest.raises(ConfigError, match=message):
            InternalAuth.load(internal)


def test_up_generates_a_private_token_unless_one_is_configured(tmp_path: Path) -> None:
    config = with_internal_token(Config(), tmp_path)
    path = Path(config.internal.token_file)
    assert path.parent == tmp_path and stat.S_IMODE(path.stat().st_mode) == 0o600
    first = InternalAuth.load(config.internal).token
    assert len(first) >= 32
    again = with_internal_token(Config(), tmp_path)  # a new run: a new token
    assert InternalAuth.load(again.internal).token != first
    configured = dataclasses.replace(Config(), internal=InternalConfig(token=TOKEN))
    assert with_internal_token(configured, tmp_path / "elsewhere") == configured
    with pytest.raises(ConfigError, match=r"internal\.token: the token must be at least"):
        with_internal_token(dataclasses.replace(Config(), internal=InternalConfig(token="short")), tmp_path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Authority, Pem, Pem]:
    ca = Authority(tmp_path_factory.mktemp("pki"))
    return ca, ca.issue("server", server=True), ca.issue("client", server=False)


def test_tls_settings_are_checked(tmp_path: Path, pki: tuple[Authority, Pem, Pem]) -> None:
    _, server, _ = pki
    assert gateway_server_credentials(GatewayConfig()) is None
    assert gateway_probe_address(Config()) == "127.0.0.1:50051"  # no TLS: the port itself
    bad = [
        (GatewayConfig(tls_cert=str(server.cert)), "gateway.tls_key: TLS needs both"),
        (GatewayConfig(tls_key=str(server.key)), "gateway.tls_cert: TLS needs both"),
        (GatewayConfig(tls_client_ca=str(server.cert)), "gateway.tls_client_ca: needs gateway.tls_cert"),
        (
            GatewayConfig(tls_cert=str(tmp_path / "no.crt"), tls_key=str(server.key)),
            "gateway.tls_cert: cannot",
        ),
    ]
    for gc, message in bad:
        with pytest.raises(ConfigError, match=message):
            gateway_server_credentials(gc)
    deep = load_config(None, {}, {"gateway.tls_cert": "x", "state_dir": "/" + "d" * 120})
    with pytest.raises(ConfigError, match=r"state_dir: .* too long for a Unix socket"):
        gateway_health_socket(deep)


async def tls_gateway(tmp_path: Path, server: Pem, client_ca: Path | None) -> tuple[ServiceServer, Config]:
    port = free_port()
    tls = {"gateway.tls_cert": str(server.cert), "gateway.tls_key": str(server.key)}
    if client_ca is not None:
        tls["gateway.tls_client_ca"] = str(client_ca)
    config = load_config(None, {}, {**tls, "gateway.port": port, "state_dir": str(tmp_path)})
    gc = config.gateway
    credentials = gateway_server_credentials(gc)
    gateway = ServiceServer(
        "gateway", gc.host, gc.port, credentials=credentials, health_socket=gateway_health_socket(config)
    )
    return await started(gateway), config


async def test_tls_gateway(tmp_path: Path, pki: tuple[Authority, Pem, Pem]) -> None:
    ca, server, _ = pki
    gateway, config = await tls_gateway(tmp_path, server, client_ca=None)
    address = gateway.address
    try:
        async with open_channel(address, ca=str(ca.pem.cert)) as channel:
            assert await every_kind(channel) == OK
        async with grpc.aio.insecure_channel(address) as channel:
            assert await every_kind(channel) == UNAVAILABLE
        (tmp_path / "other").mkdir()
        other = Authority(tmp_path / "other", "another CA")
        async with open_channel(address, ca=str(other.pem.cert)) as channel:  # a server it does not trust
            assert await every_kind(channel) == UNAVAILABLE
        credentials = grpc.ssl_channel_credentials(ca.pem.cert.read_bytes())
        assert await wait_for_serving(address, 5.0, credentials=credentials)
        # `wicore up` probes the health-only socket, in plaintext; it serves nothing else.
        probe = gateway_probe_address(config)
        assert probe == f"unix:{tmp_path}/gateway-{config.gateway.port}.health.sock"
        assert await wait_for_serving(probe, 5.0)
        async with grpc.aio.insecure_channel(probe) as channel:
            assert await every_kind(channel) == [grpc.StatusCode.UNIMPLEMENTED] * 3
    finally:
        gateway.request_stop()
        await gateway.serve_until_signal()
    assert not Path(probe.removeprefix("unix:")).exists()


async def test_mtls_gateway_requires_a_client_certificate(
    tmp_path: Path, pki: tuple[Authority, Pem, Pem]
) -> None:
    ca, server, client = pki
    gateway, config = await tls_gateway(tmp_path, server, client_ca=ca.pem.cert)
    address = gateway.address
    try:
        async with open_channel(address, str(ca.pem.cert), str(client.cert), str(client.key)) as channel:
            assert await every_kind(channel) == OK
        async with open_channel(address, ca=str(ca.pem.cert)) as channel:
            assert await every_kind(channel) == UNAVAILABLE
        assert await wait_for_serving(gateway_probe_address(config), 5.0)
    finally:
        gateway.request_stop()
        await gateway.serve_until_signal()  # the probe's server too
    with pytest.raises(ValueError, match="--tls-cert and --tls-key"):
        open_channel(address, cert=str(client.cert))
