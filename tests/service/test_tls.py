"""TLS on the public gRPC port, end to end (`wicore up` with throwaway certificates made at run
time): with `gateway.tls_client_ca` (mTLS) a client with a certificate the CA signed is served,
one without a certificate or in plaintext is refused, and `wicore up` still sees the gateway
become ready (it probes the health-only Unix socket)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from wicore.cli import build_parser
from wicore.client import generate_to_terminal, open_channel
from wicore.v1 import inference_pb2 as pb
from wicore.v1 import inference_pb2_grpc

from certs import Authority, Pem
from stack import Stack, start_stack


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Authority, Pem, Pem]:
    ca = Authority(tmp_path_factory.mktemp("pki"))
    return ca, ca.issue("server", server=True), ca.issue("client", server=False)


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_llama_dir: Path,
    redis_url: str,
    pki: tuple[Authority, Pem, Pem],
) -> Iterator[Stack]:
    ca, server, client = pki
    settings = {
        "gateway.tls_cert": str(server.cert),
        "gateway.tls_key": str(server.key),
        "gateway.tls_client_ca": str(ca.pem.cert),
        "gateway.http_port": 0,  # the gRPC port's TLS only (the HTTP port's is tested with the HTTP API)
    }
    probe = grpc.ssl_channel_credentials(
        ca.pem.cert.read_bytes(), client.key.read_bytes(), client.cert.read_bytes()
    )
    s = start_stack(
        tmp_path_factory.mktemp("tls"),
        str(tiny_llama_dir),
        redis_url,
        settings=settings,
        gateway_credentials=probe,
    )
    yield s
    assert s.stop() == 0, s.log()[-3000:]


async def generate(channel: grpc.aio.Channel) -> pb.GenerateResponse:
    request = pb.GenerateRequest(prompt="hello", max_tokens=3, ignore_eos=True)
    return await inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=30)


async def test_a_client_with_a_certificate_is_served(stack: Stack, pki: tuple[Authority, Pem, Pem]) -> None:
    ca, _, client = pki
    async with open_channel(stack.gateway, str(ca.pem.cert), str(client.cert), str(client.key)) as channel:
        assert (await generate(channel)).usage.completion_tokens == 3


@pytest.mark.parametrize(
    "how", ["plaintext", "tls without a client certificate", "certificate of another CA"]
)
async def test_other_clients_are_refused(
    stack: Stack, pki: tuple[Authority, Pem, Pem], how: str, tmp_path: Path
) -> None:
    ca, _, _ = pki
    if how == "plaintext":
        channel = grpc.aio.insecure_channel(stack.gateway)
    elif how == "tls without a client certificate":
        channel = open_channel(stack.gateway, ca=str(ca.pem.cert))
    else:
        stranger = Authority(tmp_path, "stranger CA").issue("stranger", server=False)
        channel = open_channel(stack.gateway, str(ca.pem.cert), str(stranger.cert), str(stranger.key))
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_wicore_generate_talks_tls(
    stack: Stack, pki: tuple[Authority, Pem, Pem], capsys: pytest.CaptureFixture[str]
) -> None:
    ca, _, client = pki
    tls = ["--tls-ca", str(ca.pem.cert), "--tls-cert", str(client.cert), "--tls-key", str(client.key)]
    args = build_parser().parse_args(
        ["generate", "hello", "--raw", "--max-tokens", "2", "--addr", stack.gateway, *tls]
    )
    assert await generate_to_terminal(args) == 0
    assert re.search(r"FINISH_REASON_\w+; prompt \d+, completion [12],", capsys.readouterr().err)
