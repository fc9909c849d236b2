"""NvmeTier: file format, checksums, atomic writes, capacity, recovery, O_DIRECT fallback."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import xxhash

from wicore.errors import InvalidRequest, Overloaded
from wicore.hashing import BlockHash
from wicore.tier import nvme
from wicore.tier.nvme import HEADER_SIZE, NvmeBlockMeta, NvmeTier, pack_header

from clocks import TickingClock

CAPACITY = 1 << 20


def h(i: int) -> BlockHash:
    return BlockHash(hashlib.blake2b(str(i).encode(), digest_size=16).hexdigest())


def payload(i: int, size: int = 1000) -> bytes:
    return hashlib.shake_128(f"payload-{i}".encode()).digest(size)


def meta(i: int, size: int = 1000, **extra: int) -> NvmeBlockMeta:
    return NvmeBlockMeta.describe(h(i), payload(i, size), "q4", "bfloat16", (2, 4, 16, 8), **extra)


def put(tier: NvmeTier, i: int, size: int = 1000) -> list[BlockHash]:
    return tier.put(meta(i, size), payload(i, size))


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def tier(tmp_path: Path) -> Iterator[NvmeTier]:
    t = NvmeTier(tmp_path / "nvme", CAPACITY, io_depth=4, clock=TickingClock())
    yield t
    t.close()


@pytest.mark.parametrize("size", [0, 1, 4096 - HEADER_SIZE, 4096, 300_001])
@pytest.mark.parametrize("direct", [False, True])
def test_round_trip_is_byte_identical(tmp_path: Path, size: int, direct: bool) -> None:
    tier = NvmeTier(tmp_path, CAPACITY, use_o_direct=direct)
    assert put(tier, 1, size) == []
    got = tier.get(h(1))
    assert got is not None and got[1] == payload(1, size)
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
    m = NvmeBlockMeta(h(7), "q4", "float16", (1, 2, 3, 4, 5, 6, 7, 8), 500, meta(7, 500).checksum, 4, True)
    tier.put(m, payload(7, 500))
    got = tier.get(h(7))
    assert got is not None
    assert got[0] == NvmeBlockMeta(h(7), "q4", "float16", (1, 2, 3, 4, 5, 6, 7, 8), 500, m.checksum, 4, True,
                                   created=1001.0)  # fmt: skip
    assert tier.recover() == [got[0]]


def test_header_layout_is_the_documented_one() -> None:
    m = NvmeBlockMeta(h(1), "q8", "bfloat16", (3, 5), 9, "ab" * 16, sink_tokens=4, lz4=True, created=2.5)
    raw = pack_header(m)
    assert len(raw) == HEADER_SIZE == 142
    assert raw[0:4] == b"WIKV"
    assert raw[4:8] == (2).to_bytes(2, "little") + (142).to_bytes(2, "little")
    assert raw[8:24] == bytes.fromhex(h(1))
    assert raw[24:40] == b"q8".ljust(16, b"\0")
    assert (raw[40], raw[41]) == (1, 2)
    assert raw[42:58] == b"bfloat16".ljust(16, b"\0")
    assert raw[58:66] == b"\x03\0\0\0\x05\0\0\0" and raw[66:90] == bytes(24)
    assert raw[90:94] == (4).to_bytes(4, "little") and raw[94:102] == (9).to_bytes(8, "little")
    assert raw[102:118] == b"\xab" * 16
    assert raw[126:142] == xxhash.xxh3_128_digest(raw[:126])


BAD_HASHES = ["../" * 10 + "etc/passwd", "/etc/passwd", "AB" * 16, "a" * 31, "a" * 33, "g" * 32, ""]
BAD_HASHES += ["a" * 30 + "/.", "a" * 32 + "\n", "%2e%2e" + "a" * 26]


@pytest.mark.parametrize("bad", BAD_HASHES)
def test_malformed_hashes_are_rejected_before_any_path(tier: NvmeTier, bad: str) -> None:
    for call in (tier.path_of, tier.get, tier.contains, tier.delete, lambda x: tier.evict([x])):
        with pytest.raises(InvalidRequest, match="32 lowercase hex"):
            call(bad)
    with pytest.raises(InvalidRequest, match="block_hash"):
        NvmeBlockMeta(BlockHash(bad), "q4", "float16", (1,), 0, h(0))
    with pytest.raises(InvalidRequest, match="victims"):
        tier.put(meta(1), payload(1), victims=[bad])
    assert files(tier.root) == []


@pytest.mark.parametrize(
    ("field", "change"),
    [("codec", {"codec": "x" * 17}), ("dtype", {"dtype": "bf16\n"}), ("shape", {"shape": (1,) * 9}),
     ("shape", {"shape": (1 << 32,)}), ("sink_tokens", {"sink_tokens": -1}), ("checksum", {"checksum": "z"})],
)  # fmt: skip
def test_bad_metadata_names_the_field(field: str, change: dict[str, object]) -> None:
    fields = {"block_hash": h(1), "codec": "q4", "dtype": "float16", "shape": (1,), "payload_len": 0}
    with pytest.raises(InvalidRequest, match=field):
        NvmeBlockMeta(**{**fields, "checksum": h(2), **change})


def test_put_checks_the_payload_length_and_get_the_checksum(tier: NvmeTier) -> None:
    with pytest.raises(InvalidRequest, match="payload"):
        tier.put(meta(1), payload(1, 999))
    assert files(tier.root) == [] and tier.stats().blocks == 0
    tier.put(meta(1), payload(2))  # the caller's checksum is trusted on put...
    assert tier.get(h(1)) is None  # ...and checked before anything is served
    assert files(tier.root) == [] and tier.stats().corrupt == 1


def test_put_of_a_stored_hash_changes_nothing(tier: NvmeTier) -> None:
    put(tier, 1)
    mtime = tier.path_of(h(1)).stat().st_mtime_ns
    assert put(tier, 1) == []
    assert tier.path_of(h(1)).stat().st_mtime_ns == mtime
    assert (tier.stats().bytes_in, tier.stats().blocks) == (1000, 1)


def test_capacity_is_enforced_and_evict_frees_space(tmp_path: Path) -> None:
    block = HEADER_SIZE + 1000
    tier = NvmeTier(tmp_path, 3 * block)
    for i in range(3):
        put(tier, i)
    assert tier.free_bytes == 0
    with pytest.raises(Overloaded, match="do not fit"):
        put(tier, 3)
    with pytest.raises(Overloaded):
        tier.put(meta(3, 5000), payload(3, 5000), victims=[h(0), h(1), h(2)])  # too big even then
    assert [tier.contains(h(i)) for i in range(4)] == [True, True, True, False]
    assert tier.evict([h(1), h(9)]) == [h(1)]
    assert (tier.free_bytes, tier.contains(h(1)), tier.path_of(h(1)).exists()) == (block, False, False)
    assert put(tier, 3) == []
    assert tier.stats().evictions == 1
    tier.check_integrity()
    tier.close()


def test_put_deletes_only_the_victims_it_needs_in_order(tmp_path: Path) -> None:
    block = HEADER_SIZE + 1000
    tier = NvmeTier(tmp_path, 4 * block)
    for i in range(4):
        put(tier, i)
    assert tier.put(meta(9, 1500), payload(9, 1500), victims=[h(8), h(2), h(0), h(1), h(3)]) == [h(2), h(0)]
    assert [tier.contains(h(i)) for i in (0, 1, 2, 3, 9)] == [False, True, False, True, True]
    assert tier.delete(h(1)) and not tier.delete(h(1))
    stats = tier.stats()
    assert (stats.blocks, stats.evictions, stats.used_bytes) == (2, 2, block + HEADER_SIZE + 1500)
    tier.check_integrity()
    tier.close()


def test_corrupt_payload_is_deleted_and_never_served(tier: NvmeTier) -> None:
    put(tier, 1)
    path = tier.path_of(h(1))
    data = bytearray(path.read_bytes())
    data[HEADER_SIZE + 500] ^= 0x01
    path.write_bytes(data)
    assert tier.get(h(1)) is None
    assert not path.exists() and not tier.contains(h(1))
    stats = tier.stats()
    assert (stats.corrupt, stats.misses, stats.hits, stats.blocks, stats.used_bytes) == (1, 1, 0, 0, 0)
    assert tier.get(h(1)) is None and tier.stats().corrupt == 1  # now a plain miss


@pytest.mark.parametrize("offset", [0, 4, 6, 8, 24, 40, 41, 42, 58, 90, 94, 102, 118, 126, 141])
def test_flipped_header_byte_is_detected(tier: NvmeTier, offset: int) -> None:
    put(tier, 1)
    path = tier.path_of(h(1))
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(data)
    assert tier.get(h(1)) is None
    assert not path.exists() and tier.stats().corrupt == 1


def test_truncated_file_is_dropped(tier: NvmeTier) -> None:
    for i in range(3):
        put(tier, i)
    os.truncate(tier.path_of(h(0)), HEADER_SIZE + 999)
    os.truncate(tier.path_of(h(1)), 100)  # not even a whole header
    assert tier.get(h(0)) is None  # detected on read too
    assert [m.block_hash for m in tier.recover()] == [h(2)]
    assert not tier.path_of(h(1)).exists() and tier.stats().corrupt == 2


def test_recover_removes_orphan_temp_files(tier: NvmeTier) -> None:
    put(tier, 1)
    path = tier.path_of(h(1))
    orphan = path.with_name(path.name + ".tmp-0badc0de")
    orphan.write_bytes(path.read_bytes()[:50])
    (tier.root / "ff" / f"{'f' * 32}.blk.tmp-12345678").write_bytes(b"partial")
    assert [m.block_hash for m in tier.recover()] == [h(1)]
    assert files(tier.root) == [f"{h(1)[:2]}/{h(1)}.blk"]


def test_recover_returns_exactly_the_valid_blocks(tmp_path: Path) -> None:
    writer = NvmeTier(tmp_path, CAPACITY, clock=TickingClock())
    metas = {i: meta(i, 100 * i) for i in range(1, 8)}
    for i, m in metas.items():
        writer.put(m, payload(i, 100 * i))
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
    lazily = fresh.recover()
    assert {m.block_hash for m in lazily} == {h(1), h(5), h(7)}  # h(5)'s payload is not read yet
    assert fresh.stats().corrupt == 4
    assert {m.block_hash for m in fresh.recover(verify_payloads=True)} == {h(1), h(7)}
    recovered = {m.block_hash: m for m in fresh.recover()}
    assert recovered == {h(i): replace(metas[i], created=1000.0 + i) for i in (1, 7)}
    assert all(path.exists() for path in foreign)  # not named like blocks: left alone
    assert fresh.stats().used_bytes == 2 * HEADER_SIZE + 800
    fresh.check_integrity()
    fresh.close()


def test_recover_then_get_serves_the_blocks_of_a_previous_instance(tmp_path: Path) -> None:
    first = NvmeTier(tmp_path, CAPACITY)
    put(first, 1)
    first.close()
    second = NvmeTier(tmp_path, CAPACITY)
    assert second.get(h(1)) is None  # unknown until recovered
    second.recover()
    got = second.get(h(1))
    assert got is not None and got[1] == payload(1)
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
    got = tier.get(h(1))
    assert got is not None and got[1] == payload(1)
    assert files(tmp_path) == [f"{h(1)[:2]}/{h(1)}.blk"]
    tier.close()


def test_o_direct_refused_after_open_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(fd: int, data: bytes) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    tier = NvmeTier(tmp_path, CAPACITY, use_o_direct=True)
    monkeypatch.setattr(nvme.os, "write", refuse)  # the buffered path writes through file objects
    put(tier, 1)
    monkeypatch.undo()
    got = tier.get(h(1))
    assert got is not None and got[1] == payload(1) and not tier.use_o_direct
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
    got = tier.get(h(1))
    assert got is not None and got[1] == payload(1) and not tier.use_o_direct
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
    await asyncio.gather(*(tier.aput(meta(i, 3000), payload(i, 3000)) for i in range(40)))
    results = await asyncio.gather(*(tier.aget(h(i)) for i in range(41)))
    assert [r[1] if r else None for r in results] == [payload(i, 3000) for i in range(40)] + [None]
    assert len(await tier.arecover(verify_payloads=True)) == 40
    tier.check_integrity()
    tier.close()
