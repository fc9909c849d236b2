"""Kernels WiCore compiles on the machine that runs them (C in csrc/, loaded through ctypes):
decode attention over the paged pool (`PagedDecode`), a decode step's few rows through a
linear layer (`RowsLinear`, one of the candidates cpu_kernels.tune measures), and the residual
sum with the RMS norm after it (`AddRmsNorm`, for Decoder when the model's linear layers are
WiCore's CPU ones).

torch's CPU attention pays per call and per (sequence, head) what a decode step cannot afford:
at 16 sequences of ~140 tokens, SmolLM2's 30 layers spent 17 ms of a 60-70 ms step in
attention (copying each sequence's K/V out of the pool, then SDPA), for 4 MB of K/V a layer.
`PagedDecode` runs csrc/paged_attention.c instead: each sequence's one query against its
keys read in place through its block table, every (sequence, KV head) one OpenMP task in the
process's own OpenMP runtime (torch's), ~0.1 ms a layer there.

The source is compiled once per machine, with `-O3 -march=native` (the vectors are this CPU's
widest), into `<cache_dir>/kernels/` under a name that hashes the source, the flags, the
compiler's version and the CPU, and loaded from there afterwards; several workers starting at
once each write their own file and rename it into place. Without a C compiler (`$CC`, else
`cc`), as in WiCore's container image, the kernels come from `prebuilt/` beside this module when
they are there: compiled from the same sources for x86-64 levels (`LEVELS`: v4 is AVX-512, v3
AVX2) by `python -m wicore.worker.native` where a compiler is (the image's build stage), the
widest level this CPU runs chosen. Failing both, `decode_kernel`, `linear_kernel` and
`norm_kernel` return None, and the worker does the same work through torch
(`worker.attention_backend: cascade`, MKL and oneDNN, torch's norms) and logs why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from wicore.worker.cascade import PrefixTables

log = logging.getLogger(__name__)

SOURCES = Path(__file__).with_name("csrc")
KERNELS = ("paged_attention", "linear", "norm", "decode_layers")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-fopenmp", "-Wno-psabi")
PREBUILT = Path(__file__).with_name("prebuilt")
# The x86-64 levels kernels are prebuilt for, widest first, with the CPU flags (/proc/cpuinfo) each
# needs: v3 is AVX2 with FMA, v4 adds AVX-512 (the kernels' 16-float vectors).
_V3 = frozenset({"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm", "sse4_2", "popcnt"})
LEVELS = {
    "x86-64-v4": _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
    "x86-64-v3": _V3,
}
DEFAULT_DIR = Path("~/.cache/wicore/kernels")
DTYPES = (torch.float32, torch.bfloat16)  # what the pool may hold

_ptr, _int, _i64, _float = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
# wicore_paged_decode(q, k_pool, v_pool, bf16, tables, table_stride, starts, ends, rows, heads,
#                     kv_heads, dim, block_size, window, scale, out, lse, threads)
SIGNATURE: list[Any] = [_ptr, _ptr, _ptr, _int, _ptr, _i64, _ptr, _ptr, _int, _int, _int, _int, _int, _int]
SIGNATURE += [_float, _ptr, _ptr, _int]
# wicore_prefix_decode(q, k_pool, v_pool, bf16, groups, member_offsets, members, block_offsets, blocks,
#                      ends, heads, kv_heads, dim, block_size, window, scale, out, lse, threads)
PREFIX_SIGNATURE: list[Any] = [_ptr, _ptr, _ptr, _int, _int, _ptr, _ptr, _ptr, _ptr, _ptr, _int, _int, _int]
PREFIX_SIGNATURE += [_int, _int, _float, _ptr, _ptr, _int]
# wicore_linear_rows(x, packed weight, bf16, bias, y, rows, in, out, threads)
LINEAR_SIGNATURE: list[Any] = [_ptr, _ptr, _int, _ptr, _ptr, _int, _int, _int, _int]
# wicore_add_rms_norm(h, delta, weight, x, rows, dim, eps, threads)
NORM_SIGNATURE: list[Any] = [_ptr, _ptr, _ptr, _ptr, _int, _int, _float, _int]
# wicore_decode_layers(model, kernel, h, rows, cos, sin, slots, keys, values, block_size, tables,
#                      table_stride, starts, ends, prefixes, scratch, threads)
LAYERS_SIGNATURE: list[Any] = [_ptr, _int, _ptr, _int, _ptr, _ptr, _ptr, _ptr, _ptr, _int, _ptr, _i64]
LAYERS_SIGNATURE += [_ptr, _ptr, _ptr, _ptr, _int]


class PagedDecode:
    """Decode attention over the pool: one query per row against that row's keys at positions
    [starts, ends) through its block table, read in place (csrc/paged_attention.c)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._fn = library.wicore_paged_decode
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = SIGNATURE
        self.address = address(self._fn)  # for csrc/decode_layers.c, which calls it directly
        self._prefix = library.wicore_prefix_decode
        self._prefix.restype = ctypes.c_int
        self._prefix.argtypes = PREFIX_SIGNATURE
        self.prefix_address = address(self._prefix)

    def __call__(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        tables: torch.Tensor,
        starts: torch.Tensor,
        ends: torch.Tensor,
        block_size: int,
        window: int | None,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """query [R, H, D]; keys, values [slots, Hkv, D] (one layer of the pool, fp32 or bf16);
        tables [R, blocks] int64; starts, ends [R] int64 -> out [R, H, D] in the query's dtype,
        lse [R, H] fp32 (each head's log-sum-exp: -inf where a row has no key)."""
        rows, heads, dim = query.shape
        q = query.to(torch.float32).contiguous()
        out = torch.empty_like(q)
        lse = torch.empty(rows, heads, dtype=torch.float32)
        if not (tables.dtype == starts.dtype == ends.dtype == torch.int64 and tables.is_contiguous()):
            raise ValueError("paged decode: tables, starts and ends must be contiguous int64")
        status = self._fn(
            q.data_ptr(),
            keys.data_ptr(),
            values.data_ptr(),
            int(keys.dtype == torch.bfloat16),
            tables.data_ptr(),
            tables.shape[1],
            starts.data_ptr(),
            ends.data_ptr(),
            rows,
            heads,
            keys.shape[1],
            dim,
            block_size,
            window or 0,
            scale,
            out.data_ptr(),
            lse.data_ptr(),
            torch.get_num_threads(),
        )
        if status:
            raise ValueError(
                f"paged decode: unsupported shape (heads {heads}, kv heads {keys.shape[1]}, dim {dim})"
            )
        return out.to(query.dtype), lse

    def merge_prefixes(
        self,
        query: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        prefixes: PrefixTables,
        keys: torch.Tensor,
        values: torch.Tensor,
        ends: torch.Tensor,
        block_size: int,
        window: int | None,
        scale: float,
    ) -> None:
        """Merges each shared prefix, attended once for all its members, into `out` and `lse` in
        place: query, out [R, H, D] fp32 contiguous, lse [R, H] (what `__call__` returned for each
        row's own keys); keys, values, block_size, window and scale as `__call__`'s; ends [R] int64,
        each row's key count (its query is the last)."""
        _, heads, dim = query.shape
        tensors = (query, out, lse)
        if not all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors):
            raise ValueError("prefix decode: query, out and lse must be contiguous fp32")
        status = self._prefix(
            query.data_ptr(),
            keys.data_ptr(),
            values.data_ptr(),
            int(keys.dtype == torch.bfloat16),
            *prefixes.arguments(),
            ends.data_ptr(),
            heads,
            keys.shape[1],
            dim,
            block_size,
            window or 0,
            scale,
            out.data_ptr(),
            lse.data_ptr(),
            torch.get_num_threads(),
        )
        if status:
            raise ValueError(
                f"prefix decode: unsupported shape (heads {heads}, kv heads {keys.shape[1]}, dim {dim})"
                if status == -1
                else "prefix decode: out of memory"
            )

    @staticmethod
    def supports(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> bool:
        """What the kernel takes: head dims a multiple of 16 up to 256 (8 on CPUs without AVX-512
        suffice, 16 is asked everywhere), at most 16 query heads per KV head and 256 in all, fp32 or
        bf16."""
        return (
            dtype in DTYPES
            and head_dim % 16 == 0
            and head_dim <= 256
            and heads % kv_heads == 0
            and heads // kv_heads <= 16
            and heads <= 256
        )


class RowsLinear:
    """Rows times a linear layer's fp32 or bf16 weight in this kernel's packed layout (`pack`),
    streaming the weight once for up to a dozen rows (csrc/linear.c): y [rows, out] = x [rows, in]
    @ weight.T + bias."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._fn = library.wicore_linear_rows
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = LINEAR_SIGNATURE
        self.address = address(self._fn)
        block = library.wicore_linear_block
        block.restype = ctypes.c_int
        self.block = int(block())  # output features a packed block: two of this CPU's vectors

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """weight [out, in] -> [ceil(out / block), in, block]: each block of output features one
        contiguous run, input feature by input feature (the last block padded with zeros)."""
        out, features = weight.shape
        blocks = -(-out // self.block)
        padded = torch.nn.functional.pad(weight.detach(), (0, 0, 0, blocks * self.block - out))
        return padded.view(blocks, self.block, features).transpose(1, 2).contiguous()

    def __call__(
        self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out: int
    ) -> torch.Tensor:
        """x [rows, in]; packed: `pack(weight)`; out: the weight's output features."""
        rows, features = x.shape
        if packed.shape[1:] != (features, self.block) or packed.shape[0] * self.block < out:
            raise ValueError(f"native linear: a packed weight {tuple(packed.shape)} for {features} -> {out}")
        flat = x.to(torch.float32).contiguous()
        y = torch.empty(rows, out, dtype=torch.float32)
        status = self._fn(
            flat.data_ptr(),
            packed.data_ptr(),
            int(packed.dtype == torch.bfloat16),
            None if bias is None else bias.data_ptr(),
            y.data_ptr(),
            rows,
            features,
            out,
            torch.get_num_threads(),
        )
        if status:
            raise ValueError(f"native linear: {rows} rows are not taken")
        return y.to(x.dtype)

    @classmethod
    def supports(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """fp32 or bf16 weights, a bias in fp32 (or none)."""
        return weight.dtype in DTYPES and (
            bias is None or (bias.dtype == torch.float32 and bias.is_contiguous())
        )


class AddRmsNorm:
    """h += delta (in place, when given); returns rms_norm(h) * weight, fp32 (csrc/norm.c):
    one call where torch runs a residual add and about eight operations of its RMS norm."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._fn = library.wicore_add_rms_norm
        self._fn.restype = None
        self._fn.argtypes = NORM_SIGNATURE
        self.address = address(self._fn)

    def __call__(
        self, h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        dim = h.shape[-1]
        tensors = (h, weight) if delta is None else (h, delta, weight)
        if not all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors):
            raise ValueError("native rms norm: fp32 contiguous tensors only")
        if delta is not None and delta.shape != h.shape:
            raise ValueError(f"native rms norm: delta {tuple(delta.shape)} is not h's {tuple(h.shape)}")
        x = torch.empty_like(h)
        self._fn(
            h.data_ptr(),
            None if delta is None else delta.data_ptr(),
            weight.data_ptr(),
            x.data_ptr(),
            h.numel() // dim,
            dim,
            eps,
            torch.get_num_threads(),
        )
        return x


@functools.cache
def decode_kernel(directory: str | None = None) -> PagedDecode | None:
    """The paged decode kernel, built into `directory` (default ~/.cache/wicore/kernels) on
    first use; None (logged) where it cannot be built or loaded here."""
    library = load("paged_attention", directory, "attending with torch")
    return None if library is None else PagedDecode(library)


@functools.cache
def linear_kernel(directory: str | None = None) -> RowsLinear | None:
    """The few-rows linear kernel, built like `decode_kernel`; None (logged) where it cannot be."""
    library = load("linear", directory, "linear layers through MKL and oneDNN only")
    return None if library is None else RowsLinear(library)


@functools.cache
def norm_kernel(directory: str | None = None) -> AddRmsNorm | None:
    """The residual-add and RMS norm kernel, built like `decode_kernel`; None (logged) where not."""
    library = load("norm", directory, "norms through torch")
    return None if library is None else AddRmsNorm(library)


@functools.cache
def layers_library(directory: str | None = None) -> ctypes.CDLL | None:
    """csrc/decode_layers.c built like `decode_kernel` (wicore.worker.decode_layers wraps it); None
    (logged) where it cannot be."""
    return load("decode_layers", directory, "decode steps layer by layer through torch")


def address(function: Any) -> int:
    """Where a ctypes function of a loaded library is (a C function pointer)."""
    return int(ctypes.cast(function, ctypes.c_void_p).value or 0)


@functools.cache
def blas_sgemm() -> int | None:
    """The address of `sgemm_` in torch's own BLAS (MKL in x86 builds): what `F.linear` and
    `torch.matmul` call for fp32, so a native caller computes their results bit for bit. None where
    torch's library exports none."""
    try:
        library = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        return address(library.sgemm_)
    except (OSError, AttributeError):
        return None


def load(name: str, directory: str | None, otherwise: str) -> ctypes.CDLL | None:
    folder = Path(directory).expanduser() if directory else DEFAULT_DIR.expanduser()
    source = SOURCES / f"{name}.c"
    try:
        return ctypes.CDLL(str(build(folder, source)))
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        prebuilt = find_prebuilt(source)
        if prebuilt is not None:
            log.info("native kernel %s: %s (not built here: %s)", name, prebuilt.name, exc)
            return ctypes.CDLL(str(prebuilt))
        log.warning("native kernel %s unavailable, %s: %s", name, otherwise, exc)
        return None


def prebuild(folder: Path = PREBUILT) -> list[Path]:
    """Compiles every kernel for every level in `LEVELS` into `folder` (`python -m
    wicore.worker.native`, where a compiler is); returns the libraries."""
    compiler = os.environ.get("CC", "cc")
    toolchain(compiler)  # a clear error without one
    folder.mkdir(parents=True, exist_ok=True)
    built = []
    for level in LEVELS:
        flags = level_flags(level)
        for name in KERNELS:
            source = SOURCES / f"{name}.c"
            target = folder / prebuilt_name(source, level)
            compile_library(compiler, flags, source, target)
            built.append(target)
    return built


def find_prebuilt(source: Path, folder: Path | None = None) -> Path | None:
    """The prebuilt library of `source` (as it is now) for the widest level this CPU runs, if any."""
    folder = PREBUILT if folder is None else folder
    flags = cpu_flags()
    for level, needs in LEVELS.items():
        path = folder / prebuilt_name(source, level)
        if needs <= flags and path.exists():
            return path
    return None


def level_flags(level: str) -> tuple[str, ...]:
    return tuple(f"-march={level}" if flag == "-march=native" else flag for flag in FLAGS)


def prebuilt_name(source: Path, level: str) -> str:
    """`<kernel>-<level>-<hash of the source and flags>.so`: a library of another source is not found."""
    digest = hashlib.sha256(source.read_bytes() + " ".join(level_flags(level)).encode()).hexdigest()
    return f"{source.stem}-{level}-{digest[:16]}.so"


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (Linux x86), else none."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return frozenset()
    line = next((line for line in _cpuinfo().splitlines() if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def build(folder: Path, source: Path = SOURCES / "paged_attention.c") -> Path:
    """The shared library of `source` for this machine, compiled unless already in `folder`."""
    compiler = os.environ.get("CC", "cc")
    digest = hashlib.sha256()
    for part in (source.read_bytes(), " ".join(FLAGS).encode(), toolchain(compiler).encode()):
        digest.update(part)
    target = folder / f"{source.stem}-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        built = Path(scratch) / target.name
        compile_library(compiler, FLAGS, source, built)
        os.replace(built, target)
    log.info("built %s", target)
    return target


def compile_library(compiler: str, flags: tuple[str, ...], source: Path, target: Path) -> None:
    result = subprocess.run(
        [compiler, *flags, "-o", str(target), str(source), "-lm"], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{compiler} {' '.join(flags)} failed on {source.name}: {result.stderr.strip()[-2000:]}"
        )


@functools.cache
def toolchain(compiler: str) -> str:
    """What a build depends on besides its source and flags: the compiler's version and this CPU
    (read once per process, however many kernels are built)."""
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler ({compiler!r} not found; set CC)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    return version + cpu_identity()


def cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and feature flags (Linux), else the platform."""
    text = _cpuinfo()
    if not text:
        return platform.processor() or platform.machine()
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(lines)))


@functools.cache
def _cpuinfo() -> str:
    """/proc/cpuinfo, read once per process; empty where there is none."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


if __name__ == "__main__":
    for path in prebuild():
        print(path)
