"""The NVMe tier's durable block store: one file per block, written atomically.

    root/
      00/ .. ff/                            shards, all made up front by the constructor
      ab/                                   shard = first two hex chars of the hash
        ab3f...e1.blk                       header | payload
        ab3f...e1.blk.tmp-9c2e41d0          a write in flight, or an orphan of a crash

A block file is a fixed header then the payload (little-endian throughout):

    offset size  field
    ------ ----  -------------------------------------------------------------
         0    4  magic b"WIKV"
         4    2  format version (u16, = 2)
         6    2  header length (u16, = 142)
         8   16  block hash, the raw digest (must match the file name)
        24   16  codec name, ASCII, NUL padded ("q4", "q8", "raw", ...)
        40    1  flags (bit 0: the payload is lz4-compressed)
        41    1  ndim (<= 8)
        42   16  original dtype name, ASCII, NUL padded ("bfloat16", ...)
        58   32  shape: 8 x u32, unused dims 0
        90    4  sink_tokens (u32): leading tokens kept at higher precision
        94    8  payload length (u64)
       102   16  payload checksum: XXH3-128 digest (`payload_checksum`)
       118    8  created (f64, unix seconds)
       126   16  header checksum: XXH3-128 of bytes [0, 126)
       142       payload, then end of file (file size == 142 + payload length)

Writes go to `<name>.tmp-<random>` in the same shard, are fsynced, then renamed over
the final name; so a final name only ever holds a complete file, and a crash leaves at
worst an orphan temp file that `recover` removes. The shard folder is not fsynced after
each rename (that would double a put's fsyncs): after a power loss, a block stored just
before it may be missing, never corrupt, which a cache tolerates.
Pure mechanism: no gRPC, no Redis, no eviction policy (the caller names victims).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import functools
import logging
import mmap
import os
import re
import secrets
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from wicore.errors import InvalidRequest, Overloaded
from wicore.hashing import BlockHash, payload_checksum, validate_block_hash

log = logging.getLogger(__name__)

MAGIC = b"WIKV"
FORMAT_VERSION = 2  # 2: XXH3-128 checksums (1: blake2b-128)
MAX_DIMS = 8
NAME_BYTES = 16
FLAG_LZ4 = 1
_BODY = struct.Struct("<4sHH16s16sBB16s8IIQ16sd")
HEADER_SIZE = _BODY.size + 16
ALIGN = 4096  # O_DIRECT buffers, offsets and lengths are multiples of this
SUFFIX = ".blk"
TMP_MARK = ".tmp-"
_U32_MAX = 0xFFFFFFFF
_HASH_RE = re.compile(r"[0-9a-f]{32}")
_T = TypeVar("_T")
MIN_RUN = 16  # blocks read per I/O thread hop, at least (see aget_many)


class _Corrupt(Exception):
    """A file that must never be served: bad header, wrong size or wrong payload checksum."""


@dataclass(frozen=True, slots=True)
class NvmeBlockMeta:
    """What a block file's header records; `checksum` is the payload's `payload_checksum` (hex)."""

    block_hash: BlockHash
    codec: str  # a codec's name, e.g. "q4"
    dtype: str  # the dtype the block had before encoding, e.g. "bfloat16"
    shape: tuple[int, ...]
    payload_len: int
    checksum: str
    sink_tokens: int = 0
    lz4: bool = False
    created: float = 0.0  # 0: stamped by the tier's clock on put

    def __post_init__(self) -> None:
        validate_block_hash(self.block_hash, "block_hash")
        validate_block_hash(self.checksum, "checksum")  # the same 32-hex-char form
        for field, name in (("codec", self.codec), ("dtype", self.dtype)):
            if not (0 < len(name) <= NAME_BYTES and name.isascii() and name.isprintable()):
                raise InvalidRequest(field, f"expected 1-{NAME_BYTES} ASCII chars, got {name!r:.20}")
        if len(self.shape) > MAX_DIMS or not all(0 <= d <= _U32_MAX for d in self.shape):
            raise InvalidRequest("shape", f"expected at most {MAX_DIMS} u32 dims, got {self.shape}")
        if not 0 <= self.sink_tokens <= _U32_MAX:
            raise InvalidRequest("sink_tokens", f"expected a u32, got {self.sink_tokens}")

    @classmethod
    def describe(cls, block_hash: str, payload: bytes, codec: str, dtype: str, shape: Sequence[int],
                 sink_tokens: int = 0) -> NvmeBlockMeta:  # fmt: skip
        """The metadata of `payload`, its length and checksum computed here."""
        checksum = payload_checksum(payload)
        return cls(BlockHash(block_hash), codec, dtype, tuple(shape), len(payload), checksum, sink_tokens)

    @property
    def file_bytes(self) -> int:
        return HEADER_SIZE + self.payload_len


@dataclass(frozen=True, slots=True)
class NvmeStats:
    blocks: int
    used_bytes: int
    capacity_bytes: int
    hits: int
    misses: int
    bytes_in: int
    bytes_out: int
    corrupt: int
    evictions: int


def _digest(data: bytes) -> bytes:
    return bytes.fromhex(payload_checksum(data))


def pack_header(meta: NvmeBlockMeta) -> bytes:
    shape = list(meta.shape) + [0] * (MAX_DIMS - len(meta.shape))
    flags = FLAG_LZ4 if meta.lz4 else 0
    body = _BODY.pack(MAGIC, FORMAT_VERSION, HEADER_SIZE, bytes.fromhex(meta.block_hash), meta.codec.encode(),
                      flags, len(meta.shape), meta.dtype.encode(), *shape, meta.sink_tokens, meta.payload_len,
                      bytes.fromhex(meta.checksum), meta.created)  # fmt: skip
    return body + _digest(body)


def _verify(block_hash: BlockHash, header: bytes, size: int, payload: bytes | None) -> NvmeBlockMeta:
    """The header's metadata, or _Corrupt; checks the payload too unless it is None."""
    body = header[: _BODY.size]
    if len(header) < HEADER_SIZE or header[:4] != MAGIC or _digest(body) != header[_BODY.size :]:
        raise _Corrupt("truncated header, bad magic or header checksum mismatch")
    _, version, header_len, raw_hash, codec, flags, ndim, dtype, *rest = _BODY.unpack(body)
    shape, (sink_tokens, payload_len, checksum, created) = rest[:MAX_DIMS], rest[MAX_DIMS:]
    if version != FORMAT_VERSION or header_len != HEADER_SIZE or ndim > MAX_DIMS or flags & ~FLAG_LZ4:
        raise _Corrupt(f"unsupported header (version {version}, length {header_len}, flags {flags})")
    if raw_hash.hex() != block_hash:
        raise _Corrupt(f"header names block {raw_hash.hex()}")
    try:
        meta = NvmeBlockMeta(block_hash, codec.rstrip(b"\0").decode(), dtype.rstrip(b"\0").decode(),
                             tuple(shape[:ndim]), payload_len, checksum.hex(), sink_tokens,
                             bool(flags & FLAG_LZ4), created)  # fmt: skip
    except (InvalidRequest, UnicodeDecodeError) as exc:
        raise _Corrupt(str(exc)) from None
    if size != meta.file_bytes:
        raise _Corrupt(f"file is {size} bytes, header says {meta.file_bytes}")
    if payload is not None and (len(payload) != payload_len or payload_checksum(payload) != meta.checksum):
        raise _Corrupt("payload checksum mismatch")
    return meta


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class NvmeTier:
    """Owns the block files under `root`; after `recover()` its index matches the disk.

    Invariants (under `_lock`): every indexed hash has a complete file of the indexed
    size (header + payload; the disk rounds it up to its block size), and
    `used_bytes == sum(_sizes.values())`; writes in flight are not indexed (a get
    misses them) but their bytes are reserved, so `used_bytes + _reserved <=
    capacity_bytes` unless capacity shrank across a restart. The tier never evicts
    on its own: the caller's policy names the victims. Call `recover()` before
    serving a root that may already hold files.
    """

    def __init__(
        self,
        root: Path,
        capacity_bytes: int,
        io_depth: int = 32,
        use_o_direct: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if capacity_bytes < 1 or io_depth < 1:
            raise ValueError(f"capacity_bytes and io_depth must be positive: {capacity_bytes}, {io_depth}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for shard in {f"{i:02x}" for i in range(256)} - {p.name for p in self.root.iterdir()}:
            (self.root / shard).mkdir()  # made once here, so no put pays a second folder fsync
        _fsync_dir(self.root)
        self.capacity_bytes = capacity_bytes
        self.use_o_direct = use_o_direct
        self._clock = clock
        self._lock = threading.Lock()
        self._sizes: dict[BlockHash, int] = {}
        self._writing: set[BlockHash] = set()
        self._reserved = self.used_bytes = self.hits = self.misses = self.bytes_in = self.bytes_out = 0
        self.corrupt = self.evictions = 0
        self._io_depth = io_depth
        self._root_str = str(self.root)
        self._pool = ThreadPoolExecutor(max_workers=io_depth, thread_name_prefix="nvme-io")

    def path_of(self, block_hash: str) -> Path:
        """The block's file; the hash is validated first, so no input can name another path."""
        h = validate_block_hash(block_hash, "block_hash")
        return self.root / h[:2] / f"{h}{SUFFIX}"

    @property
    def free_bytes(self) -> int:
        return max(0, self.capacity_bytes - self.used_bytes - self._reserved)

    def sizes_of(self, block_hash: BlockHash) -> int:
        """The block's file size; 0 if it is not stored."""
        return self._sizes.get(block_hash, 0)

    def sizes(self) -> dict[BlockHash, int]:
        """Each stored block's file size (a copy)."""
        with self._lock:
            return dict(self._sizes)

    def contains(self, block_hash: str) -> bool:
        return validate_block_hash(block_hash, "block_hash") in self._sizes

    def put(self, meta: NvmeBlockMeta, payload: bytes, victims: Iterable[str] = ()) -> list[BlockHash]:
        """Stores a block durably; returns the victims deleted to make room for it.

        Victims go in the order given, only as many as needed; if the block does not
        fit even then, Overloaded is raised and nothing is deleted. A hash already
        stored is left as it is (a hash names its content). `meta.checksum` is
        trusted, not recomputed (that would double put's CPU cost): a wrong one
        only makes `get` find the block corrupt and drop it.
        """
        if meta.payload_len != len(payload):
            raise InvalidRequest("payload", f"{len(payload)} bytes, its metadata says {meta.payload_len}")
        meta = meta if meta.created else replace(meta, created=self._clock())
        h, size = meta.block_hash, meta.file_bytes
        candidates = [validate_block_hash(v, "victims") for v in victims]
        with self._lock:
            if h in self._sizes or h in self._writing:
                return []
            evicted = self._make_room(h, size, candidates)
            self._writing.add(h)
            self._reserved += size
        written = False
        try:
            self._write(self.path_of(h), pack_header(meta), payload)
            written = True
        finally:
            with self._lock:
                self._writing.discard(h)
                self._reserved -= size
                if written:
                    self._sizes[h] = size
                    self.used_bytes += size
                    self.bytes_in += len(payload)
        return evicted

    def _get_run(self, hashes: list[str], count: bool) -> list[tuple[NvmeBlockMeta, bytes] | None]:
        return [self.get(h, count) for h in hashes]

    def get(self, block_hash: str, count: bool = True) -> tuple[NvmeBlockMeta, bytes] | None:
        """The block with both checksums verified, or None; a bad file is deleted, never served."""
        h = validate_block_hash(block_hash, "block_hash")
        try:
            if h not in self._sizes:
                raise FileNotFoundError(h)
            header, size, payload = self._read(f"{self._root_str}/{h[:2]}/{h}{SUFFIX}")  # h is validated
            meta = _verify(h, header, size, payload)
        except (_Corrupt, FileNotFoundError) as exc:
            with self._lock:
                self.misses += count
                if isinstance(exc, _Corrupt):
                    log.warning("NVMe block %s is corrupt (%s): deleted", h, exc)
                    self.corrupt += 1
                self._remove(h)
            return None
        with self._lock:
            self.hits += count
            self.bytes_out += len(payload) if count else 0
        return meta, payload

    def delete(self, block_hash: str) -> bool:
        """Removes a block (not counted as an eviction); False if it was not stored."""
        h = validate_block_hash(block_hash, "block_hash")
        with self._lock:
            return self._remove(h)

    def evict(self, hashes: Iterable[str]) -> list[BlockHash]:
        """Removes the blocks the caller's policy chose; returns those that were stored."""
        checked = [validate_block_hash(h, "hashes") for h in hashes]
        with self._lock:
            evicted = [h for h in checked if self._remove(h)]
            self.evictions += len(evicted)
        return evicted

    def recover(self, verify_payloads: bool = False) -> list[NvmeBlockMeta]:
        """Rebuilds the index from the files on disk; returns every valid block's metadata.

        Removes orphan temp files and deletes files whose header is invalid or whose
        size disagrees with it. Payloads are checked lazily, on `get`, by default: a
        crash cannot leave a partial file under a final name (files are renamed into
        place after fsync), so only outside damage corrupts a payload, and reading
        every payload would make start-up cost a full read of the tier; `get` still
        never serves a bad payload. `verify_payloads=True` reads them all now.
        Must not overlap puts. Files not named like blocks are left alone.
        """
        metas: list[NvmeBlockMeta] = []
        orphans = corrupt = 0
        for path in sorted(self.root.glob("[0-9a-f][0-9a-f]/*")):
            h = path.name.removesuffix(SUFFIX)
            if TMP_MARK in path.name:
                path.unlink(missing_ok=True)
                orphans += 1
            elif path.name.endswith(SUFFIX) and _HASH_RE.fullmatch(h) and h[:2] == path.parent.name:
                try:
                    metas.append(self._recover_one(BlockHash(h), path, verify_payloads))
                except _Corrupt as exc:
                    log.warning("NVMe block %s is invalid (%s): deleted", h, exc)
                    path.unlink(missing_ok=True)
                    corrupt += 1
        with self._lock:
            self._sizes = {m.block_hash: m.file_bytes for m in metas}
            self.used_bytes = sum(self._sizes.values())
            self.corrupt += corrupt
        log.info("NVMe tier: %d blocks, %d of %d bytes; removed %d temp files, %d invalid files",
                 len(metas), self.used_bytes, self.capacity_bytes, orphans, corrupt)  # fmt: skip
        return metas

    async def aput(self, meta: NvmeBlockMeta, payload: bytes, victims: Iterable[str] = ()) -> list[BlockHash]:
        return await self._run(self.put, meta, payload, list(victims))

    async def aget(self, block_hash: str) -> tuple[NvmeBlockMeta, bytes] | None:
        return await self._run(self.get, block_hash)

    async def aget_many(
        self, hashes: Sequence[str], count: bool = True
    ) -> list[tuple[NvmeBlockMeta, bytes] | None]:
        """`get` of each hash, in order: a few I/O threads each read a run of blocks.

        One thread hop costs more than reading a cached block, so blocks go in runs of
        at least `MIN_RUN`, in at most `io_depth` runs at once.
        """
        runs = max(1, min(self._io_depth, len(hashes) // MIN_RUN))
        size = -(-len(hashes) // runs)
        parts = [list(hashes[i : i + size]) for i in range(0, len(hashes), size)]
        results = await asyncio.gather(*(self._run(self._get_run, part, count) for part in parts))
        return [r for part in results for r in part]

    async def arecover(self, verify_payloads: bool = False) -> list[NvmeBlockMeta]:
        return await self._run(self.recover, verify_payloads)

    def close(self) -> None:
        """Waits for the I/O in flight, then stops the I/O threads."""
        self._pool.shutdown(wait=True)

    def stats(self) -> NvmeStats:
        with self._lock:
            return NvmeStats(len(self._sizes), self.used_bytes, self.capacity_bytes, self.hits, self.misses,
                             self.bytes_in, self.bytes_out, self.corrupt, self.evictions)  # fmt: skip

    def check_integrity(self) -> None:
        """Raises AssertionError unless the index, the byte count and the files agree."""
        with self._lock:
            sizes = {h: self.path_of(h).stat().st_size for h in self._sizes if self.path_of(h).is_file()}
            if sizes != self._sizes or self.used_bytes != sum(sizes.values()):
                raise AssertionError(f"index {self._sizes} != files {sizes} or used_bytes {self.used_bytes}")

    async def _run(self, fn: Callable[..., _T], *args: object) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    def _recover_one(self, h: BlockHash, path: Path, verify_payload: bool) -> NvmeBlockMeta:
        if verify_payload:
            return _verify(h, *self._read(path))
        with open(path, "rb") as f:
            return _verify(h, f.read(HEADER_SIZE), os.fstat(f.fileno()).st_size, None)

    def _make_room(self, h: BlockHash, size: int, candidates: list[BlockHash]) -> list[BlockHash]:
        """Deletes the first victims that make `size` bytes fit, or raises Overloaded (lock held)."""
        need = size - self.free_bytes
        chosen: list[BlockHash] = []
        for victim in dict.fromkeys(candidates):
            if need > 0 and victim != h and victim in self._sizes:
                chosen.append(victim)
                need -= self._sizes[victim]
        if need > 0:
            free, capacity = self.free_bytes, self.capacity_bytes
            raise Overloaded(f"block {h}: {size} bytes do not fit the NVMe tier ({free} of {capacity} free)")
        for victim in chosen:
            self._remove(victim)
        self.evictions += len(chosen)
        return chosen

    def _remove(self, h: BlockHash) -> bool:
        size = self._sizes.pop(h, None)
        if size is None:
            return False
        self.used_bytes -= size
        self.path_of(h).unlink(missing_ok=True)
        return True

    def _write(self, path: Path, header: bytes, payload: bytes) -> None:
        """Temp file, fsync, rename over the final name (see the module docstring)."""
        tmp = path.with_name(f"{path.name}{TMP_MARK}{secrets.token_hex(4)}")
        try:
            if not (self.use_o_direct and self._write_direct(tmp, header, payload)):
                with open(tmp, "xb") as f:
                    f.write(header)
                    f.write(payload)
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _write_direct(self, tmp: Path, header: bytes, payload: bytes) -> bool:
        """Writes through O_DIRECT from an aligned, padded buffer; False if the filesystem refuses."""
        total, fd = len(header) + len(payload), -1
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
            with mmap.mmap(-1, -(-total // ALIGN) * ALIGN) as buf:  # mmap memory is page-aligned
                buf[: len(header)] = header
                buf[len(header) : total] = payload
                if os.write(fd, buf) != len(buf):
                    raise OSError(errno.EIO, f"short O_DIRECT write to {tmp}")
            os.ftruncate(fd, total)  # drop the padding: file size == header + payload
            os.fsync(fd)
        except OSError as exc:
            tmp.unlink(missing_ok=True)  # open may have created it before refusing
            return self._direct_refused(exc)
        finally:
            if fd >= 0:
                os.close(fd)
        return True

    def _read(self, path: Path | str) -> tuple[bytes, int, bytes]:
        """(header bytes, file size, payload bytes) as found on disk, unchecked."""
        if self.use_o_direct:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError as exc:
                self._direct_refused(exc)
            else:
                try:
                    size = os.fstat(fd).st_size
                    with mmap.mmap(-1, -(-size // ALIGN) * ALIGN or ALIGN) as buf:
                        n = os.preadv(fd, [buf], 0)
                        return buf[:HEADER_SIZE], size, buf[HEADER_SIZE:n]
                finally:
                    os.close(fd)
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            return os.read(fd, HEADER_SIZE), size, os.read(fd, max(0, size - HEADER_SIZE))
        finally:
            os.close(fd)

    def _direct_refused(self, exc: OSError) -> bool:
        """Falls back to buffered I/O when the filesystem refuses O_DIRECT (EINVAL); re-raises others."""
        if exc.errno != errno.EINVAL:
            raise exc
        if self.use_o_direct:
            log.info("O_DIRECT refused under %s (%s): using buffered I/O from now on", self.root, exc)
            self.use_o_direct = False
        return False


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
MALLOC_KEEP_BYTES = 32 << 20  # glibc's largest mmap threshold on 64-bit


def keep_freed_memory() -> bool:
    """Asks glibc to keep freed block buffers instead of returning them to the OS.

    Block payloads are 0.1-1 MB: by default glibc serves each with fresh pages (mmap, or
    heap memory trimmed back on free), and the page faults of that first touch made an
    NVMe get cost 2-3x a plain read of the same cached file (measured by
    benchmark/tier_bench.py). Returns False where this is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(
        libc.mallopt(M_MMAP_THRESHOLD, MALLOC_KEEP_BYTES)
        and libc.mallopt(M_TRIM_THRESHOLD, 4 * MALLOC_KEEP_BYTES)
    )
