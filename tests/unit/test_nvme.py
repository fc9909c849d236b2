"""NvmeTier: file format, checksums, atomic writes, capacity, recovery, O_DIRECT fallback."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import xxhash

from wicore.errors import InvalidRequest, Overloaded
from wicore.kv.block import BlockHeader, Codec, EncodedBlock
from wicore.kv.codecs import decode, encode
from wicore.kv.hashing import BlockHash
from wicore.tier import nvme
from wicore.tier.nvme import HEADER_SIZE, NvmeTier, pack_header
from wicore.tier.store import Recovered

from clocks import TickingClock

CAPACITY = 1 << 20
SHAPE = (2, 2, 16, 4, 8)  # [layers, 2, tokens, kv_heads, head_dim]


def h(i: int) -> BlockHash:
    return BlockHash(hashlib.blake2b(str(i).encode(), digest_size=16).hexdigest())


def payload(i: int, size: int = 1000) -> bytes:
    return hashlib.shake_128(f"payload-{i}".encode()).digest(size)


def block(i: int, size: int = 1000) -> EncodedBlock:
    """A valid q4 header over `size` bytes of noise: the tier stores payloads without decoding
    them, so any length can be tested (a real q4 block of SHAPE is one fixed size)."""
    return EncodedBlock.of(Codec.Q4, False, "bfloat16", SHAPE, 0, payload(i, size))


def put(tier: NvmeTier, i: int, size: int = 1000) -> None:
    tier.write_block(h(i), block(i, size))


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def tier(tmp_path: Path) -> Iterator[NvmeTier]:
    t = NvmeTier(tmp_path / "nvme", CAPACITY, io_depth=4, clock=TickingClock())
    yield t
    t.close()


@pytest.mark.parametrize("size", [1, 4096 - HEADER_SIZE, 4096, 300_001])
@pytest.mark.parametrize("direct", [False, True])
def test_round_trip_is_byte_identical(tmp_path: Path, size: int, direct: bool) -> None:
    tier = NvmeTier(tmp_path, CAPACITY, use_o_direct=direct)
    put(tier, 1, size)
    assert tier.read_block(h(1)) == block(1, size)  # header and payload
    assert tier.size_of(h(1)) == HEADER_SIZE + size and tier.sizes() == {h(1): HEADER_SIZE + size}
    path = tier.path_of(h(1))
    assert path == tmp_path / h(1)[:2] / f"{h(1)}.blk"
    assert path.stat().st_size == HEADER_SIZE + size  # O_DIRECT padding truncated away
    assert files(tmp_path) == [f"{h(1)[:2]}/{h(1)}.blk"]  # no temp file left behind
    stats = tier.stats()
    assert (stats.blocks, stats.used_bytes, stats.hits, stats.bytes_in, stats.bytes_out) == (
        1, HEADER_SIZE + size, 1, size, size,
    )  # fmt: skip
    tier.check_integrity()
    tier.close()


def test_header_fields_round_trip(tier: NvmeTier) -> None:
    b = EncodedBlock.of(Codec.Q8, True, "float16", (3, 2, 5, 7, 9), 4, payload(7, 500))  # no field default
    tier.write_block(h(7), b)  # created 0: the tier's clock
    tier.write_block(h(8), b, created=5.5)
    assert tier.read_block(h(7)) == b and tier.read_block(h(8)) == b
    recovered = {r.block_hash: r for r in tier.recover_sync()}
    assert recovered == {
        h(7): Recovered(h(7), HEADER_SIZE + 500, 1001.0),
        h(8): Recovered(h(8), HEADER_SIZE + 500, 5.5),
    }
    kv = torch.zeros(SHAPE, dtype=torch.bfloat16)
    kv[:, :, :4] = 3.0
    real = encode(kv, Codec.Q4, sink_tokens=4)  # a real block: lz4-framed, sinks kept
    assert real.header.lz4
    tier.write_block(h(9), real)
    got = tier.read_block(h(9))
    assert got == real and got is not None and torch.equal(decode(got), kv)


def test_header_layout_is_the_documented_one() -> None:
    header = BlockHeader(Codec.Q8, True, "bfloat16", (3, 2, 5, 7, 9), 4, 9, "ab" * 16)
    raw = pack_header(h(1), header, 2.5)
    assert len(raw) == HEADER_SIZE == 142
    assert raw[0:4] == b"WIKV"
    assert raw[4:8] == (2).to_bytes(2, "little") + (142).to_bytes(2, "little")
    assert raw[8:24] == bytes.fromhex(h(1))
    assert raw[24:40] == b"q8".ljust(16, b"\0")
    assert (raw[40], raw[41]) == (1, 5)
    assert raw[42:58] == b"bfloat16".ljust(16, b"\0")
    assert raw[58:78] == struct.pack("<5I", 3, 2, 5, 7, 9) and raw[78:90] == bytes(12)
    assert raw[90:94] == (4).to_bytes(4, "little") and raw[94:102] == (9).to_bytes(8, "little")
    assert raw[102:118] == b"\xab" * 16
    assert raw[118:126] == struct.pack("<d", 2.5)
    assert raw[126:142] == xxhash.xxh3_128_digest(raw[:126])


BAD_HASHES = ["../" * 10 + "etc/passwd", "/etc/passwd", "AB" * 16, "a" * 31, "a" * 33, "g" * 32, ""]
BAD_HASHES += ["a" * 30 + "/.", "a" * 32 + "\n", "%2e%2e" + "a" * 26]


@pytest.mark.parametrize("bad", BAD_HASHES)
def test_malformed_hashes_are_rejected_before_any_path(tier: NvmeTier, bad: str) -> None:
    calls = (tier.path_of, tier.read_block, tier.contains, lambda x: tier.remove_blocks([x]),
             lambda x: tier.write_block(x, block(1)))  # fmt: skip
    for call in calls:
        with pytest.raises(InvalidRequest, match="32 lowercase hex"):
            call(bad)
    assert files(tier.root) == []


def _forged_file(tier: NvmeTier, i: int, **change: object) -> Path:
    """Block i's file with header fields replaced and the header checksum recomputed, as if a
    buggy or foreign writer made it."""
    names = ("magic", "version", "length", "hash", "codec", "flags", "ndim", "dtype",
             *(f"d{k}" for k in range(8)), "sink_tokens", "payload_len", "checksum", "created")  # fmt: skip
    body = tier.path_of(h(i)).read_bytes()[: nvme._BODY.size]
    fields = dict(zip(names, nvme._BODY.unpack(body), strict=True))
    body = nvme._BODY.pack(*{**fields, **change}.values())
    path = tier.path_of(h(i))
    path.write_bytes(body + nvme._digest(body) + payload(i))
    return path


@pytest.mark.parametrize(
    "change",
    [{"codec": b"x" * 16}, {"codec": b"\xff"}, {"dtype": b"int8"}, {"dtype": b"bf16\n"}, {"ndim": 4},
     {"ndim": 9}, {"d1": 3}, {"d2": 0}, {"sink_tokens": 17}, {"flags": 2}],
)  # fmt: skip
def test_a_header_with_invalid_fields_is_never_served(tier: NvmeTier, change: dict[str, object]) -> None:
    """The file's header fields get BlockHeader's checks (tests/unit/test_codecs.py names each
    field); a file that fails them is deleted like any corrupt one."""
    put(tier, 1)
    put(tier, 2)
    path = _forged_file(tier, 1, **change)
    assert tier.read_block(h(1)) is None and not path.exists()
    _forged_file(tier, 2, **change)
    assert tier.recover_sync() == [] and files(tier.root) == []
    assert tier.stats().corrupt == 2


def test_put_trusts_the_checksum_and_get_checks_it(tier: NvmeTier) -> None:
    with pytest.raises(InvalidRequest, match="payload"):  # a length the header denies cannot be put
        EncodedBlock(block(1).header, payload(1, 999))
    tier.write_block(h(1), EncodedBlock(block(1).header, payload(2)))  # the caller's checksum is trusted...
    assert tier.read_block(h(1)) is None  # ...and checked before anything is served
    assert files(tier.root) == [] and tier.stats().corrupt == 1


def test_put_of_a_stored_hash_changes_nothing(tier: NvmeTier) -> None:
    put(tier, 1)
    mtime = tier.path_of(h(1)).stat().st_mtime_ns
    tier.write_block(h(1), block(2))  # a hash names its content: not rewritten
    assert tier.path_of(h(1)).stat().st_mtime_ns == mtime
    assert tier.read_block(h(1)) == block(1)
    assert (tier.stats().bytes_in, tier.stats().blocks) == (1000, 1)


def test_capacity_is_enforced_and_evict_frees_space(tmp_path: Path) -> None:
    block_bytes = HEADER_SIZE + 1000
    tier = NvmeTier(tmp_path, 3 * block_bytes)
    for i in range(3):
        put(tier, i)
    assert tier.free_bytes == 0
    with pytest.raises(Overloaded, match="do not fit"):
        put(tier, 3)
    assert [tier.contains(h(i)) for i in range(4)] == [True, True, True, False]
    assert files(tmp_path) == sorted(f"{h(i)[:2]}/{h(i)}.blk" for i in range(3))  # nothing of h(3)
    assert tier.remove_blocks([h(1), h(9)], evicted=True) == [h(1)]
    assert (tier.free_bytes, tier.contains(h(1)), tier.path_of(h(1)).exists()) == (block_bytes, False, False)
    put(tier, 3)
    assert tier.remove_blocks([h(0), h(0)]) == [h(0)]  # not an eviction: the caller dropped it
    stats = tier.stats()
    assert (stats.blocks, stats.evictions, stats.used_bytes) == (2, 1, 2 * block_bytes)
    tier.check_integrity()
    tier.close()


def test_enospc_makes_what_is_held_the_capacity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The filesystem filled before capacity_bytes: the bytes held become the capacity, so the
    caller's policy evicts to make room from then on."""
    tier = NvmeTier(tmp_path, CAPACITY)
    put(tier, 1)
    put(tier, 2)

    def disk_full(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nvme.os, "replace", disk_full)
    with pytest.raises(OSError, match="No space"):
        put(tier, 3)
    monkeypatch.undo()
    assert tier.capacity_bytes == tier.used_bytes == 2 * (HEADER_SIZE + 1000) and tier.free_bytes == 0
    with pytest.raises(Overloaded, match="do not fit"):
        put(tier, 3)
    assert files(tmp_path) == sorted(f"{h(i)[:2]}/{h(i)}.blk" for i in (1, 2))
    tier.check_integrity()
    tier.close()


def test_corrupt_payload_is_deleted_and_never_served(tier: NvmeTier) -> None:
    put(tier, 1)
    path = tier.path_of(h(1))
    data = bytearray(path.read_bytes())
    data[HEADER_SIZE + 500] ^= 0x01
    path.write_bytes(data)
    assert tier.read_block(h(1)) is None
    assert not path.exists() and not tier.contains(h(1))
    stats = tier.stats()
    assert (stats.corrupt, stats.misses, stats.hits, stats.blocks, stats.used_bytes) == (1, 1, 0, 0, 0)
    assert tier.read_block(h(1)) is None and tier.stats().corrupt == 1  # now a plain miss


@pytest.mark.parametrize("offset", [0, 4, 6, 8, 24, 40, 41, 42, 58, 90, 94, 102, 118, 126, 141])
def test_flipped_header_byte_is_detected(tier: NvmeTier, offset: int) -> None:
    put(tier, 1)
    path = tier.path_of(h(1))
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(data)
    assert tier.read_block(h(1)) is None
    assert not path.exists() and tier.stats().corrupt == 1


def test_truncated_file_is_dropped(tier: NvmeTier) -> None:
    for i in range(3):
        put(tier, i)
    os.truncate(tier.path_of(h(0)), HEADER_SIZE + 999)
    os.truncate(tier.path_of(h(1)), 100)  # not even a whole header
    assert tier.read_block(h(0)) is None  # detected on read too
    assert [r.block_hash for r in tier.recover_sync()] == [h(2)]
    assert not tier.path_of(h(1)).exists() and tier.stats().corrupt == 2


def test_recover_removes_orphan_temp_files(tier: NvmeTier) -> None:
    put(tier, 1)
    path = tier.path_of(h(1))
    orphan = path.with_name(path.name + ".tmp-0badc0de")
    orphan.write_bytes(path.read_bytes()[:50])
    (tier.root / "ff" / f"{'f' * 32}.blk.tmp-12345678").write_bytes(b"partial")
    assert [r.block_hash for r in tier.recover_sync()] == [h(1)]
    assert files(tier.root) == [f"{h(1)[:2]}/{h(1)}.blk"]


def test_recover_returns_exactly_the_valid_blocks(tmp_path: Path) -> None:
    writer = NvmeTier(tmp_path, CAPACITY, clock=TickingClock())
    for i in range(1, 8):
        writer.write_block(h(i), block(i, 100 * i))
    writer.close()
    os.truncate(writer.path_of(h(2)), HEADER_SIZE + 150)  # partial write
    with writer.path_of(h(3)).open("ab") as f:
        f.write(b"x")  # longer than its header says
    header_flip = bytearray(writer.path_of(h(4)).read_bytes())
    header_flip[30] ^= 1
    writer.path_of(h(4)).write_bytes(header_flip)
    payload_flip = bytearray(writer.path_of(h(5)).read_bytes())
    payload_flip[-1] ^= 1
    writer.path_of(h(5)).write_bytes(payload_flip)
    writer.path_of(h(6)).rename(writer.path_of(h(9)))  # its header names another block
    foreign = [tmp_path / "notes.txt", tmp_path / "zz" / "x.blk", tmp_path / h(7)[:2] / "README"]
    for path in foreign:
        path.parent.mkdir(exist_ok=True)
        path.write_text("not a block")

    fresh = NvmeTier(tmp_path, CAPACITY)
    lazily = fresh.recover_sync()
    assert {r.block_hash for r in lazily} == {h(1), h(5), h(7)}  # h(5)'s payload is not read yet
    assert fresh.stats().corrupt == 4
    assert {r.block_hash for r in fresh.recover_sync(verify_payloads=True)} == {h(1), h(7)}
    recovered = {r.block_hash: r for r in fresh.recover_sync()}
    assert recovered == {h(i): Recovered(h(i), HEADER_SIZE + 100 * i, 1000.0 + i) for i in (1, 7)}
    assert fresh.read_block(h(7)) == block(7, 700)
    assert all(path.exists() for path in foreign)  # not named like blocks: left alone
    assert fresh.stats().used_bytes == 2 * HEADER_SIZE + 800
    fresh.check_integrity()
    fresh.close()


def test_recover_then_get_serves_the_blocks_of_a_previous_instance(tmp_path: Path) -> None:
    first = NvmeTier(tmp_path, CAPACITY)
    put(first, 1)
    first.close()
    second = NvmeTier(tmp_path, CAPACITY)
    assert second.read_block(h(1)) is None  # unknown until recovered
    second.recover_sync()
    assert second.read_block(h(1)) == block(1)
    second.close()


def test_o_direct_refused_falls_back_to_buffered_io(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_open = os.open

    def refuse_direct(path: str | Path, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(nvme.os, "open", refuse_direct)
    tier = NvmeTier(tmp_path, CAPACITY, use_o_direct=True)
    with caplog.at_level(logging.INFO, logger="wicore.tier.nvme"):
        put(tier, 1)
    assert not tier.use_o_direct
    assert "O_DIRECT refused" in caplog.text
    assert tier.read_block(h(1)) == block(1)
    assert files(tmp_path) == [f"{h(1)[:2]}/{h(1)}.blk"]
    tier.close()


def test_o_direct_refused_after_open_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(fd: int, data: bytes) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    tier = NvmeTier(tmp_path, CAPACITY, use_o_direct=True)
    monkeypatch.setattr(nvme.os, "write", refuse)  # the buffered path writes through file objects
    put(tier, 1)
    monkeypatch.undo()
    assert tier.read_block(h(1)) == block(1) and not tier.use_o_direct
    assert files(tmp_path) == [f"{h(1)[:2]}/{h(1)}.blk"]
    tier.close()


def test_o_direct_refused_on_read_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tier = NvmeTier(tmp_path, CAPACITY)
    put(tier, 1)
    real_open = os.open

    def refuse_direct(path: str | Path, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(nvme.os, "open", refuse_direct)
    tier.use_o_direct = True
    assert tier.read_block(h(1)) == block(1) and not tier.use_o_direct
    tier.close()


def test_other_o_direct_errors_are_not_hidden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(path: str | Path, flags: int, *args: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    tier = NvmeTier(tmp_path, CAPACITY, use_o_direct=True)
    monkeypatch.setattr(nvme.os, "open", no_space)
    with pytest.raises(OSError, match="No space"):
        put(tier, 1)
    monkeypatch.undo()
    assert tier.use_o_direct and tier.free_bytes == CAPACITY and files(tmp_path) == []
    tier.close()


def test_failed_write_leaves_no_trace(tier: NvmeTier, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_replace(src: object, dst: object) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(nvme.os, "replace", broken_replace)
    with pytest.raises(OSError, match="I/O error"):
        put(tier, 1)
    assert files(tier.root) == [] and tier.free_bytes == CAPACITY and not tier.contains(h(1))


async def test_async_puts_and_gets_run_concurrently(tmp_path: Path) -> None:
    tier = NvmeTier(tmp_path, CAPACITY, io_depth=8)
    await asyncio.gather(*(tier.put(h(i), block(i, 3000), 0.0) for i in range(40)))
    want = [block(i, 3000) for i in range(40)] + [None]
    assert await tier.get_many([h(i) for i in range(41)]) == want  # runs of blocks on several threads
    results = await asyncio.gather(*(tier.get_many([h(i)]) for i in range(41)))
    assert [r for (r,) in results] == want
    assert len(await tier.recover(verify_payloads=True)) == 40
    assert await tier.remove([h(0), h(99)], evicted=True) == [h(0)]
    assert (tier.stats().blocks, tier.stats().evictions) == (39, 1)
    tier.check_integrity()
    tier.close()
