"""Chaos: clients that open long streams and never read them.

What happens (measured with these tests): gRPC flow control does not push back past the
gateway. The Python gRPC core (asyncio) completes a server's writes and a client's reads
into its own buffers without waiting for the application or the peer's HTTP/2 window, so:

- a `grpc.aio` client that starts a call and never iterates it still receives the whole
  stream into its own process (its transport reads it all);
- a client that never reads its socket at all (raw HTTP/2 here: the default 64 KiB window,
  never a WINDOW_UPDATE) makes the *gateway* hold the rest of the stream, at most one
  stream's output per such request: `max_tokens` (capped by the context) messages. Its
  request keeps its gateway slot meanwhile, so `gateway.max_concurrent_requests` bounds
  how many such streams the gateway holds. (Observed, not asserted: about 20 s after the
  call started, gRPC's transport gives up on such a connection, the gateway's writes fail,
  logged by grpc's own Cython layer as ExecuteBatchError tracebacks, and the slots free.)

Either way the scheduler and the worker never see back-pressure: the worker decodes the
request to its `max_tokens` at full speed (its per-request asyncio.Queue drains as fast as
the engine fills it, so it stays short; it could only hold at most `max_tokens` deltas),
then frees its KV blocks and its batch slot, and the scheduler its reservation, as for any
finished request. Nothing grows without bound: the gateway's extra memory is bounded by the
unread streams' bytes (RSS_SLACK_BYTES + RSS_FACTOR x the bytes of those streams), and other
clients' requests complete within OTHER_BOUND_S each all along.
"""

from __future__ import annotations

import socket
import statistics
import struct
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from wicore.v1 import inference_pb2 as pb
from wicore.v1 import inference_pb2_grpc

from chaos_util import idle_since, port_of, proc_sample, read_all, worker_status
from stack import Stack, pid_listening_on, start_stack, until

UNREAD = 3
TOKENS = 4000  # the tiny model's context is 4096
LOGPROBS = 20  # ~300 bytes a message: each unread stream carries ~1.2 MB, far past a 64 KiB window
OTHERS = 10
OTHER_BOUND_S = 5.0  # each other request, while the unread streams decode (measured: ~0.15 s)
DONE_BOUND_S = 180.0  # the unread streams decoded to their end (measured: ~25 s at ~150 steps/s)
RSS_SLACK_BYTES = 16 << 20
RSS_FACTOR = 2


def unread_request(i: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt=f"never read {i}", max_tokens=TOKENS, ignore_eos=True, logprobs=LOGPROBS, cache_salt=f"u{i}"
    )


OTHER = pb.GenerateRequest(prompt="an ordinary request", max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, redis_url: str) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("slow-client"), str(tiny_llama_dir), redis_url)
    yield s
    assert s.stop() == 0, s.log()[-3000:]


@pytest.fixture()
async def client(stack: Stack) -> AsyncIterator[inference_pb2_grpc.InferenceStub]:
    async with grpc.aio.insecure_channel(stack.gateway) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


def gateway_rss(stack: Stack) -> int:
    """The gateway's resident memory, in bytes."""
    return proc_sample(pid_listening_on(stack.proc.pid, port_of(stack.gateway))).rss_kib * 1024


async def latencies(client: inference_pb2_grpc.InferenceStub, n: int) -> list[float]:
    """Seconds each of n short requests took, one after the other; each must succeed."""
    seconds = []
    for _ in range(n):
        started = time.monotonic()
        reply = await client.Generate(OTHER, timeout=60)
        seconds.append(time.monotonic() - started)
        assert reply.usage.completion_tokens == 16
    return seconds


async def others_while_unread(stack: Stack, client: inference_pb2_grpc.InferenceStub) -> list[float]:
    """Waits until the scheduler has placed every unread stream, then times OTHERS requests."""
    await until(lambda: _inflight_at_least(stack, UNREAD), "the unread streams to be placed", 30)
    seconds = await latencies(client, OTHERS)
    assert max(seconds) < OTHER_BOUND_S, seconds
    assert any(w.load.running >= UNREAD for w in await worker_status(stack)), "they ended too soon"
    return seconds


async def _inflight_at_least(stack: Stack, n: int) -> bool:
    return sum(w.inflight for w in await worker_status(stack)) >= n


@pytest.mark.slow
async def test_grpc_client_that_never_iterates_holds_nothing_upstream(
    stack: Stack, client: inference_pb2_grpc.InferenceStub
) -> None:
    usual = statistics.median(await latencies(client, 5))  # also warms the gateway up
    rss_before = gateway_rss(stack)
    async with grpc.aio.insecure_channel(stack.gateway) as slow_channel:
        slow = inference_pb2_grpc.InferenceStub(slow_channel)
        calls = [slow.GenerateStream(unread_request(i)) for i in range(UNREAD)]  # started, never iterated
        started = time.monotonic()
        during = await others_while_unread(stack, client)
        await until(lambda: idle_since(stack, started), "the unread streams to end server-side", DONE_BOUND_S)
        rss_growth = gateway_rss(stack) - rss_before
        results = [await read_all(call) for call in calls]  # only now: all of it is there
    assert [(r.code, len(r.token_ids)) for r in results] == [("OK", TOKENS)] * UNREAD
    unread_bytes = sum(r.wire_bytes for r in results)
    print(
        f"never iterated: others took {statistics.median(during):.3f} s median, {max(during):.3f} s max "
        f"({usual:.3f} s before); gateway RSS grew {rss_growth / 2**20:.1f} MiB for "
        f"{unread_bytes / 2**20:.1f} MiB unread"
    )
    assert rss_growth < RSS_SLACK_BYTES + RSS_FACTOR * unread_bytes


@pytest.mark.slow
async def test_client_that_never_reads_its_socket_costs_the_gateway_one_stream_each(
    stack: Stack, client: inference_pb2_grpc.InferenceStub
) -> None:
    await latencies(client, 3)
    rss_before = gateway_rss(stack)
    sockets = [open_unread(stack.gateway, unread_request(i)) for i in range(UNREAD)]
    try:
        started = time.monotonic()
        during = await others_while_unread(stack, client)
        await until(lambda: idle_since(stack, started), "the unread streams to end server-side", DONE_BOUND_S)
        rss_growth = gateway_rss(stack) - rss_before
    finally:
        for sock in sockets:
            sock.close()
    unread_bytes = await stream_bytes(client) * UNREAD
    print(
        f"never read the socket: others took {statistics.median(during):.3f} s median, {max(during):.3f} s "
        f"max; gateway RSS grew {rss_growth / 2**20:.1f} MiB for {unread_bytes / 2**20:.1f} MiB unread"
    )
    assert rss_growth < RSS_SLACK_BYTES + RSS_FACTOR * unread_bytes
    await latencies(client, 3)  # the gateway serves on after the sockets close


async def stream_bytes(client: inference_pb2_grpc.InferenceStub) -> int:
    """The bytes on the wire (gRPC framing included) of one stream like the unread ones."""
    result = await read_all(client.GenerateStream(unread_request(99), timeout=DONE_BOUND_S))
    assert result.code == "OK"
    return result.wire_bytes


# --- a raw HTTP/2 client that sends one request and never reads again ---------------------


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _header(name: str, value: str) -> bytes:
    """An HPACK literal header field without indexing, new name, no Huffman coding."""
    n, v = name.encode(), value.encode()
    assert len(n) < 127 and len(v) < 127
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


SETTINGS, HEADERS, DATA = 4, 1, 0
ACK = END_STREAM = 1
END_HEADERS = 4


def open_unread(address: str, request: pb.GenerateRequest) -> socket.socket:
    """Sends `request` to GenerateStream over a fresh HTTP/2 connection, reads only the server's
    first SETTINGS frame (to acknowledge it), and returns the socket, never to be read again:
    the server may send the default 64 KiB window and then must hold the rest."""
    host, port = address.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel absorbs little either
    sock.settimeout(10)
    sock.connect((host, int(port)))
    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(SETTINGS, 0, 0, b""))
    head = sock.recv(9, socket.MSG_WAITALL)
    assert len(head) == 9 and head[3] == SETTINGS, head
    length = int.from_bytes(head[:3], "big")
    if length:
        sock.recv(length, socket.MSG_WAITALL)
    fields = [(":method", "POST"), (":scheme", "http"), (":path", "/wicore.v1.Inference/GenerateStream"),
              (":authority", address), ("content-type", "application/grpc"), ("te", "trailers")]  # fmt: skip
    body = request.SerializeToString()
    message = b"\x00" + struct.pack(">I", len(body)) + body
    sock.sendall(
        _frame(SETTINGS, ACK, 0, b"")
        + _frame(HEADERS, END_HEADERS, 1, b"".join(_header(k, v) for k, v in fields))
        + _frame(DATA, END_STREAM, 1, message)
    )
    return sock
