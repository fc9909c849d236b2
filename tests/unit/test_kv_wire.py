"""The block chunk stream (wicore.kv.wire): `block_chunks` and the `ChunkAssembler` both ends use."""

from __future__ import annotations

import hashlib

import pytest
import torch

from wicore.errors import InvalidRequest
from wicore.kv.block import Codec, EncodedBlock, StorageTier
from wicore.kv.codecs import encode
from wicore.kv.hashing import BlockHash
from wicore.kv.wire import ChunkAssembler, ReceivedBlock, block_chunks
from wicore.v1 import tier_pb2

MAX_BLOCK_BYTES = 1 << 20


def h(i: int) -> BlockHash:
    return BlockHash(hashlib.blake2b(str(i).encode(), digest_size=16).hexdigest())


def block(seed: int = 0, codec: Codec = Codec.Q4) -> EncodedBlock:
    kv = torch.randn((2, 2, 16, 2, 64), generator=torch.Generator().manual_seed(seed)).half()
    return encode(kv, codec, sink_tokens=4)


def chunks(i: int, b: EncodedBlock, chunk_bytes: int = 1000, tier: StorageTier | None = None) -> list:
    return list(block_chunks(h(i), b, chunk_bytes, tier))


def assemble(stream: list[tier_pb2.BlockChunk]) -> list[ReceivedBlock]:
    assembler = ChunkAssembler(MAX_BLOCK_BYTES)
    received = [r for chunk in stream if (r := assembler.feed(chunk)) is not None]
    assembler.finish()
    return received


def fails(stream: list[tier_pb2.BlockChunk], field: str, max_block_bytes: int = MAX_BLOCK_BYTES) -> str:
    """Feeds `stream` then finishes it; returns the message of the InvalidRequest, which must name `field`."""
    assembler = ChunkAssembler(max_block_bytes)
    with pytest.raises(InvalidRequest) as exc:
        for chunk in stream:
            assembler.feed(chunk)
        assembler.finish()
    assert exc.value.field == field, str(exc.value)
    return str(exc.value)


@pytest.mark.parametrize("tier", [None, StorageTier.CPU, StorageTier.NVME])
@pytest.mark.parametrize("codec", [Codec.RAW, Codec.Q4])
def test_a_block_in_chunks_comes_back_identical(tier: StorageTier | None, codec: Codec) -> None:
    b = block(1, codec)
    stream = chunks(1, b, 1000, tier)
    assert len(stream) == -(-b.nbytes // 1000) > 1
    assert [c.HasField("header") for c in stream] == [True] + [False] * (len(stream) - 1)
    assert [c.offset for c in stream] == list(range(0, b.nbytes, 1000))
    assert all(c.block_hash == h(1) for c in stream)
    assert assemble(stream) == [ReceivedBlock(h(1), b, tier)]  # header, payload, checksum: all equal


def test_a_stream_of_blocks_and_a_block_in_one_chunk() -> None:
    blocks = {i: block(i, codec) for i, codec in enumerate(Codec)}
    stream = [c for i, b in blocks.items() for c in chunks(i, b, b.nbytes if i == 0 else 4096)]
    received = assemble(stream)
    assert [(r.block_hash, r.block, r.source_tier) for r in received] == [
        (h(i), b, None) for i, b in blocks.items()
    ]
    assert all(r.block.verify() for r in received)


def test_missing_header_is_rejected() -> None:
    stream = chunks(1, block())
    message = fails(stream[1:], "header")
    assert "must carry its header" in message
    stream[0].ClearField("header")
    fails(stream, "header")


def test_wrong_offset_is_rejected() -> None:
    stream = chunks(1, block())
    assert "expected offset 1000, got 2000" in fails([stream[0], stream[2]], "offset")
    stream[0].offset = 1
    fails(stream[:1], "offset")


def test_excess_data_is_rejected() -> None:
    b = block()
    stream = chunks(1, b, b.nbytes)  # one chunk holding the whole payload
    stream[0].data += b"\0"
    assert f"over payload_bytes={b.nbytes}" in fails(stream, "data")


def test_a_chunk_of_another_block_before_the_end_is_rejected() -> None:
    first, second = chunks(1, block(1)), chunks(2, block(2))
    assert "ended after 1000 of" in fails([first[0], second[0]], "data")
    stray = tier_pb2.BlockChunk(block_hash=h(2), offset=1000, data=first[1].data)  # no header
    fails([first[0], stray], "data")


def test_bad_checksum_is_rejected() -> None:
    stream = chunks(1, block())
    data = bytearray(stream[-1].data)
    data[-1] ^= 0x01
    stream[-1].data = bytes(data)
    assert "payload does not match checksum" in fails(stream, "header.checksum")


def test_truncated_stream_is_rejected() -> None:
    b = block()
    stream = chunks(1, b)
    assert f"ended after {1000 * (len(stream) - 1)} of {b.nbytes} bytes" in fails(stream[:-1], "data")


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("header.codec", {"codec": tier_pb2.CODEC_UNSPECIFIED}),
        ("header.dtype", {"dtype": "int8"}),
        ("header.shape", {"shape": [2, 2, 16, 128]}),
        ("header.sink_tokens", {"sink_tokens": 17}),
        ("header.payload_bytes", {"payload_bytes": 0}),
        ("header.payload_bytes", {"payload_bytes": MAX_BLOCK_BYTES + 1}),
        ("header.checksum", {"checksum": "not hex"}),
        ("header.block_hash", {"block_hash": h(9)}),
        ("header.block_hash", {"block_hash": "../etc/passwd"}),
    ],
)
def test_bad_header_fields_are_named(field: str, change: dict[str, object]) -> None:
    stream = chunks(1, block())
    header = stream[0].header
    for name, value in change.items():
        if name == "shape":
            del header.shape[:]
            header.shape.extend(value)
        else:
            setattr(header, name, value)
    fails(stream, field)


def test_malformed_chunk_hash_is_rejected() -> None:
    stream = chunks(1, block())
    stream[0].block_hash = "A" * 32
    fails(stream, "block_hash")
