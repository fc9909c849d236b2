"""The NVMe tier: durable block files, one per block, written atomically (a `BlockStore`).

    root/
      00/ .. ff/                            shards, all made up front by the constructor
      ab/                                   shard = first two hex chars of the hash
        ab3f...e1.blk                       header | payload
        ab3f...e1.blk.tmp-9c2e41d0          a write in flight, or an orphan of a crash

A block file is a fixed header then the payload (little-endian throughout); bytes 24-118
are the block's `BlockHeader` (wicore.kv.block), the same fields as on the wire:

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
Pure mechanism: no gRPC, no Redis, no eviction policy (the manager names victims). When
the filesystem fills before `capacity_bytes`, what the tier holds becomes its capacity.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import functools
import logging
import mmap
import os
import secrets
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from wicore.errors import InvalidRequest, Overloaded
from wicore.kv.block import BlockHeader, Codec, EncodedBlock, StorageTier
from wicore.kv.hashing import BlockHash, is_digest_hex, payload_checksum, validate_block_hash
from wicore.tier.store import Recovered, TierStats

log = logging.getLogger(__name__)

MAGIC = b"WIKV"
FORMAT_VERSION = 2  # 2: XXH3-128 checksums (1: blake2b-128)
MAX_DIMS = 8
FLAG_LZ4 = 1
_BODY = struct.Struct("<4sHH16s16sBB16s8IIQ16sd")
HEADER_SIZE = _BODY.size + 16
ALIGN = 4096  # O_DIRECT buffers, offsets and lengths are multiples of this
SUFFIX = ".blk"
TMP_MARK = ".tmp-"
_T = TypeVar("_T")
MIN_RUN = 16  # blocks read per I/O thread hop, at least (see aget_many)


class _Corrupt(Exception):
    """A file that must never be served: bad header, wrong size or wrong payload checksum."""


def _digest(data: bytes) -> bytes:
    return bytes.fromhex(payload_checksum(data))


def pack_header(block_hash: BlockHash, header: BlockHeader, created: float) -> bytes:
    shape = list(header.shape) + [0] * (MAX_DIMS - len(header.shape))
    flags = FLAG_LZ4 if header.lz4 else 0
    body = _BODY.pack(MAGIC, FORMAT_VERSION, HEADER_SIZE, bytes.fromhex(block_hash),
                      header.codec.value.encode(), flags, len(header.shape), header.dtype.encode(), *shape,
                      header.sink_tokens, header.payload_bytes, bytes.fromhex(header.checksum),
                      created)  # fmt: skip
    return body + _digest(body)


def _verify(
    block_hash: BlockHash, header: bytes, size: int, payload: bytes | None
) -> tuple[BlockHeader, float]:
    """The block's header and creation time, or _Corrupt; checks the payload too unless it is None."""
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
        block = BlockHeader(Codec(codec.rstrip(b"\0").decode()), bool(flags & FLAG_LZ4),
                            dtype.rstrip(b"\0").decode(), tuple(shape[:ndim]), sink_tokens, payload_len,
                            checksum.hex())  # fmt: skip
    except (InvalidRequest, ValueError) as exc:  # ValueError: an unknown codec, or not UTF-8
        raise _Corrupt(str(exc)) from None
    if size != HEADER_SIZE + payload_len:
        raise _Corrupt(f"file is {size} bytes, header says {HEADER_SIZE + payload_len}")
    if payload is not None and (len(payload) != payload_len or payload_checksum(payload) != block.checksum):
        raise _Corrupt("payload checksum mismatch")
    return block, created


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
    serving a root that may already hold files. The synchronous methods run on any
    thread; the `BlockStore` ones (async) run them on the tier's I/O threads.
    """

    kind = StorageTier.NVME
    durable = True

    def __init__(
        self,
        root: Path,
        capacity_bytes: int,
        codec: Codec = Codec.Q4,
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
        self.codec = codec
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

    def footprint(self, block: EncodedBlock) -> int:
        return HEADER_SIZE + block.nbytes

    def size_of(self, block_hash: BlockHash) -> int:
        return self._sizes.get(block_hash, 0)

    def sizes(self) -> dict[BlockHash, int]:
        with self._lock:
            return dict(self._sizes)

    def contains(self, block_hash: str) -> bool:
        return validate_block_hash(block_hash, "block_hash") in self._sizes

    def codec_of(self, block_hash: BlockHash) -> Codec:
        return self.codec

    # --- synchronous operations ---

    def write_block(self, block_hash: str, block: EncodedBlock, created: float = 0.0) -> None:
        """Stores a block durably (`created` 0: now). Overloaded if it does not fit the free
        bytes; OSError if the write fails (ENOSPC also shrinks the capacity to what is held).

        A hash already stored is left as it is (a hash names its content). The header's
        checksum is trusted, not recomputed (that would double a put's CPU cost): a wrong
        one only makes `read_block` find the block corrupt and drop it.
        """
        h = validate_block_hash(block_hash, "block_hash")
        size = self.footprint(block)
        with self._lock:
            if h in self._sizes or h in self._writing:
                return
            if size > self.free_bytes:
                free, capacity = self.free_bytes, self.capacity_bytes
                raise Overloaded(
                    f"block {h}: {size} bytes do not fit the NVMe tier ({free} of {capacity} free)"
                )
            self._writing.add(h)
            self._reserved += size
        written = False
        try:
            self._write(
                self.path_of(h), pack_header(h, block.header, created or self._clock()), block.payload
            )
            written = True
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                with self._lock:
                    self._disk_full()
            raise
        finally:
            with self._lock:
                self._writing.discard(h)
                self._reserved -= size
                if written:
                    self._sizes[h] = size
                    self.used_bytes += size
                    self.bytes_in += block.nbytes

    def read_block(self, block_hash: str, count: bool = True) -> EncodedBlock | None:
        """The block with both checksums verified, or None; a bad file is deleted, never served."""
        h = validate_block_hash(block_hash, "block_hash")
        try:
            if h not in self._sizes:
                raise FileNotFoundError(h)
            header, size, payload = self._read(f"{self._root_str}/{h[:2]}/{h}{SUFFIX}")  # h is validated
            block_header, _ = _verify(h, header, size, payload)
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
        return EncodedBlock(block_header, payload)

    def remove_blocks(self, hashes: Iterable[str], evicted: bool = False) -> list[BlockHash]:
        """Removes blocks; returns those that were stored. `evicted`: the caller's policy chose them."""
        checked = [validate_block_hash(h, "block_hashes") for h in hashes]
        with self._lock:
            removed = [h for h in checked if self._remove(h)]
            if evicted:
                self.evictions += len(removed)
        return removed

    def recover_sync(self, verify_payloads: bool = False) -> list[Recovered]:
        """Rebuilds the index from the files on disk; returns every valid block.

        Removes orphan temp files and deletes files whose header is invalid or whose
        size disagrees with it. Payloads are checked lazily, on read, by default: a
        crash cannot leave a partial file under a final name (files are renamed into
        place after fsync), so only outside damage corrupts a payload, and reading
        every payload would make start-up cost a full read of the tier; a read still
        never serves a bad payload. `verify_payloads=True` reads them all now.
        Must not overlap puts. Files not named like blocks are left alone.
        """
        found: list[Recovered] = []
        orphans = corrupt = 0
        for path in sorted(self.root.glob("[0-9a-f][0-9a-f]/*")):
            h = path.name.removesuffix(SUFFIX)
            if TMP_MARK in path.name:
                path.unlink(missing_ok=True)
                orphans += 1
            elif path.name.endswith(SUFFIX) and is_digest_hex(h) and h[:2] == path.parent.name:
                try:
                    header, created = self._recover_one(BlockHash(h), path, verify_payloads)
                except _Corrupt as exc:
                    log.warning("NVMe block %s is invalid (%s): deleted", h, exc)
                    path.unlink(missing_ok=True)
                    corrupt += 1
                else:
                    found.append(Recovered(BlockHash(h), HEADER_SIZE + header.payload_bytes, created))
        with self._lock:
            self._sizes = {r.block_hash: r.size_bytes for r in found}
            self.used_bytes = sum(self._sizes.values())
            self.corrupt += corrupt
        log.info("NVMe tier: %d blocks, %d of %d bytes; removed %d temp files, %d invalid files",
                 len(found), self.used_bytes, self.capacity_bytes, orphans, corrupt)  # fmt: skip
        return found

    # --- BlockStore ---

    async def put(self, block_hash: BlockHash, block: EncodedBlock, created: float) -> None:
        await self._run(self.write_block, block_hash, block, created)

    async def get_many(self, hashes: Sequence[BlockHash], count: bool = True) -> list[EncodedBlock | None]:
        """`read_block` of each hash, in order: a few I/O threads each read a run of blocks.

        One thread hop costs more than reading a cached block, so blocks go in runs of
        at least `MIN_RUN`, in at most `io_depth` runs at once.
        """
        stored = [h for h in hashes if h in self._sizes]  # the others miss without a thread hop
        if count and len(stored) < len(hashes):
            with self._lock:
                self.misses += len(hashes) - len(stored)
        if not stored:
            return [None] * len(hashes)
        runs = max(1, min(self._io_depth, len(stored) // MIN_RUN))
        size = -(-len(stored) // runs)
        parts = [stored[i : i + size] for i in range(0, len(stored), size)]
        results = await asyncio.gather(*(self._run(self._read_run, part, count) for part in parts))
        read = dict(zip(stored, (r for part in results for r in part), strict=True))
        return [read.get(h) for h in hashes]

    async def remove(self, hashes: Sequence[BlockHash], evicted: bool) -> list[BlockHash]:
        return await self._run(self.remove_blocks, hashes, evicted)

    async def recover(self, verify_payloads: bool = False) -> list[Recovered]:
        return await self._run(self.recover_sync, verify_payloads)

    def close(self) -> None:
        """Waits for the I/O in flight, then stops the I/O threads."""
        self._pool.shutdown(wait=True)

    def stats(self) -> TierStats:
        with self._lock:
            return TierStats(self.kind, self.codec, self.capacity_bytes, self.used_bytes, len(self._sizes),
                             self.hits, self.misses, self.bytes_in, self.bytes_out, self.evictions,
                             self.corrupt)  # fmt: skip

    def check_integrity(self) -> None:
        """Raises AssertionError unless the index, the byte count and the files agree."""
        with self._lock:
            sizes = {h: self.path_of(h).stat().st_size for h in self._sizes if self.path_of(h).is_file()}
            if sizes != self._sizes or self.used_bytes != sum(sizes.values()):
                raise AssertionError(f"index {self._sizes} != files {sizes} or used_bytes {self.used_bytes}")

    # --- mechanics ---

    def _read_run(self, hashes: list[BlockHash], count: bool) -> list[EncodedBlock | None]:
        return [self.read_block(h, count) for h in hashes]

    async def _run(self, fn: Callable[..., _T], *args: object) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    def _recover_one(self, h: BlockHash, path: Path, verify_payload: bool) -> tuple[BlockHeader, float]:
        if verify_payload:
            return _verify(h, *self._read(path))
        with open(path, "rb") as f:
            return _verify(h, f.read(HEADER_SIZE), os.fstat(f.fileno()).st_size, None)

    def _disk_full(self) -> None:
        """The filesystem filled before `capacity_bytes` (lock held): what the tier holds is then
        its real capacity, so the next demotions evict the lowest scores to make room instead of
        failing one by one. (Until a restart; a disk full of other files leaves an empty tier as it is.)"""
        if 0 < self.used_bytes < self.capacity_bytes:
            log.warning(
                "the NVMe directory is full at %d bytes (capacity was %d); using that as its capacity",
                self.used_bytes, self.capacity_bytes,
            )  # fmt: skip
            self.capacity_bytes = self.used_bytes

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
