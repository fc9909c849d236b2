"""Linear layers for CPU workers: fp32/bf16 weights through the kernel measured fastest for
each number of rows, and int8 weights.

A decode step multiplies every weight by a few rows (one per running sequence), so its
speed is how fast a kernel streams the weight from memory, and which kernel does that
best depends on the machine, not only on the shape. Measured over SmolLM2's 211 linear
layers (fp32, 2 threads, 538 MB a sweep):

| rows | `F.linear` (MKL, x @ W.T) | W @ x.T (MKL) | oneDNN packed | native | machine |
|---|---|---|---|---|---|
| 1 | 27.7 ms | - | 31.0 ms | - | Intel Xeon, AMX |
| 1 | 45.1 ms | 17.3 ms (as 2 rows) | 25.8 ms | 13-14 ms | AMD EPYC, AVX-512 |
| 2 | 72.6 ms | 17.3 ms | 29.2 ms | 14-17 ms | AMD EPYC, AVX-512 |
| 16 | 66.7 ms | 56.4 ms | 33.8 ms | - | AMD EPYC, AVX-512 |

(MKL runs one row as a matrix-vector product on one core; W @ x.T with two rows is a
GEMM that both cores share; `native` (csrc/linear.c, where a C compiler built it) streams
each weight once over both cores, from its own packed layout, for up to a dozen rows at a
time. The native rows above were its first version, which read the plain weight one output
row at a time for up to 4 rows; its packed successor, on the Intel Xeon (2026-12-01, one
sweep each, alternated): 1 row 31-35 ms (MKL 31-35, oneDNN 42-44), 16 rows 46-52 ms
(oneDNN 61-70).) So `worker.cpu_kernels: auto`, the default, measures the candidates at
load: one sweep over all of the model's own layers per candidate and row count
(`TUNED_ROWS`), the fastest of four, and every layer then multiplies n rows with the
kernel measured fastest at the smallest tuned count >= n (oneDNN above the last: prefill
is compute-bound, where it wins). Each layer keeps its plain weight only while some row
count uses an MKL kernel, and the native kernel's packed copy only while some row count
uses that one (while tuning, a layer holds all three). `onednn` uses oneDNN at every size
(one copy). Packed and MKL results differ in the last bits, so greedy output can differ
from `model.generate` at near-ties: `worker.cpu_kernels: default` keeps the model's own
kernels, bit for bit.

`worker.weight_quant: int8` stores every linear layer's weight as int8 with one
symmetric scale per output channel (`Int8Linear`) and multiplies through torch's own
weight-only kernel (`aten._weight_int8pack_mm`): a decode step reads a quarter of the
fp32 bytes; activations stay in the model's dtype.
"""

from __future__ import annotations

import bisect
import enum
import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from wicore.worker.native import RowsLinear, linear_kernel

TUNED_ROWS = (1, 2, 4, 8, 16, 32, 64)


class Kernel(enum.StrEnum):
    ONEDNN = "onednn"  # the weight reordered once into oneDNN's blocked layout
    MKL = "mkl"  # F.linear on the plain weight: x @ W.T
    MKL_WT = "mkl_wt"  # W @ x.T on the plain weight, at least two rows (one is padded)
    NATIVE = "native"  # up to 4 rows streaming the plain weight once (csrc/linear.c), where built


@dataclass(frozen=True, slots=True)
class KernelTable:
    """Which kernel multiplies n rows: `kernels[i]` up to `rows[i]` rows, oneDNN above the last."""

    rows: tuple[int, ...] = ()
    kernels: tuple[Kernel, ...] = ()

    def pick(self, rows: int) -> Kernel:
        i = bisect.bisect_left(self.rows, rows)
        return self.kernels[i] if i < len(self.kernels) else Kernel.ONEDNN

    @property
    def uses_plain(self) -> bool:
        return any(k in (Kernel.MKL, Kernel.MKL_WT) for k in self.kernels)

    @property
    def uses_native(self) -> bool:
        return Kernel.NATIVE in self.kernels

    def describe(self) -> str:
        """`rows 1-2 mkl_wt, 3-64 onednn, 65+ onednn`: consecutive counts with one kernel merged."""
        spans: list[str] = []
        low = 1
        for i, (high, kernel) in enumerate(zip(self.rows, self.kernels, strict=True)):
            if i + 1 < len(self.kernels) and self.kernels[i + 1] is kernel:
                continue
            spans.append(f"{low}-{high} {kernel}" if low != high else f"{low} {kernel}")
            low = high + 1
        spans.append(f"{low}+ {Kernel.ONEDNN}")
        return "rows " + ", ".join(spans)


class CpuLinear(nn.Module):
    """A linear layer that multiplies through the kernel its model's `KernelTable` names for the
    number of rows. It holds its weight reordered for oneDNN (packed for `batch_hint` rows) and,
    while any row count uses an MKL kernel, plain, and while any uses the native kernel, in its
    packed layout."""

    def __init__(
        self, linear: nn.Linear, batch_hint: int, table: KernelTable, native: RowsLinear | None = None
    ) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.plain: torch.Tensor | None = weight
        self.table = table
        # The native kernel where it is built and takes this layer (else NATIVE runs oneDNN).
        self.native = native if native is not None and RowsLinear.supports(weight, self.bias) else None
        self.native_weight = None if self.native is None else self.native.pack(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = self.multiply(flat, self.table.pick(flat.shape[0]))
        return out.view(*x.shape[:-1], self.out_features)

    def multiply(self, flat: torch.Tensor, kernel: Kernel) -> torch.Tensor:
        """flat [rows, in] -> [rows, out] through `kernel`."""
        rows = flat.shape[0]
        if kernel is Kernel.NATIVE:
            if self.native is not None and self.native_weight is not None:
                return self.native(flat, self.native_weight, self.bias, self.out_features)
            kernel = Kernel.ONEDNN  # not built here
        if kernel is Kernel.ONEDNN or self.plain is None:
            bucket = _bucket(rows)
            if bucket != rows:
                flat = torch.nn.functional.pad(flat, (0, 0, 0, bucket - rows))
            elif not flat.is_contiguous():
                flat = flat.contiguous()
            out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
            return out[:rows]
        if kernel is Kernel.MKL:
            return torch.nn.functional.linear(flat, self.plain, self.bias)
        if rows == 1:
            flat = torch.cat((flat, flat))
        out = torch.matmul(self.plain, flat.t()).t()[:rows].contiguous()
        return out if self.bias is None else out.add_(self.bias)

    @property
    def weight_nbytes(self) -> int:
        """Bytes a forward pass reads of the weights (one of the copies)."""
        bias = 0 if self.bias is None else self.bias.nbytes
        return self.in_features * self.out_features * self.packed.element_size() + bias


def tune(
    layers: Sequence[CpuLinear], rows: Sequence[int] = TUNED_ROWS, repeats: int = 3
) -> tuple[KernelTable, dict[int, dict[str, float]]]:
    """The fastest kernel at each row count, timed over all `layers` in turn (a sweep reads every
    weight from memory, as a decode step does): one warm-up sweep per kernel, then `repeats`
    rounds in which every kernel sweeps once, in a rotating order, so that a slow moment (another
    process, the first touches of a weight) falls on every candidate alike; each kernel's fastest
    sweep counts. Returns the table and the seconds each candidate took."""
    if not layers:
        return KernelTable(), {}
    dtype = layers[0].packed.dtype
    native = all(layer.native is not None for layer in layers)
    seconds: dict[int, dict[str, float]] = {}
    chosen: list[Kernel] = []
    generator = torch.Generator().manual_seed(0)  # the process's random state is left alone
    with torch.inference_mode():
        for n in rows:
            kernels = [k for k in Kernel if k is not Kernel.NATIVE or native]
            features = {layer.in_features for layer in layers}
            inputs = {f: torch.randn(n, f, generator=generator).to(dtype) for f in features}
            timed = {kernel.value: float("inf") for kernel in kernels}
            for round_ in range(repeats + 1):
                for i in range(len(kernels)):
                    kernel = kernels[(round_ + i) % len(kernels)]
                    start = time.perf_counter()
                    for layer in layers:
                        layer.multiply(inputs[layer.in_features], kernel)
                    if round_:
                        timed[kernel.value] = min(timed[kernel.value], time.perf_counter() - start)
            seconds[n] = timed
            chosen.append(Kernel(min(timed, key=timed.__getitem__)))
    return KernelTable(tuple(rows), tuple(_fewer_copies(chosen, seconds, rows))), seconds


COPY_MARGIN = 1.05  # how much faster an MKL kernel must be to keep a third copy of the weights


def _fewer_copies(
    chosen: list[Kernel], seconds: dict[int, dict[str, float]], rows: Sequence[int]
) -> list[Kernel]:
    """Where both the MKL kernels (the plain weight) and the native one (its packed copy) won some
    row count, each MKL pick within COPY_MARGIN of the native kernel's time goes to the native
    kernel; if none is left, the plain weight need not be kept (a copy of the weights less)."""
    if Kernel.NATIVE not in chosen or not any(k in (Kernel.MKL, Kernel.MKL_WT) for k in chosen):
        return chosen
    kept = [
        Kernel.NATIVE
        if k in (Kernel.MKL, Kernel.MKL_WT)
        and seconds[n][Kernel.NATIVE.value] <= COPY_MARGIN * seconds[n][k.value]
        else k
        for k, n in zip(chosen, rows, strict=True)
    ]
    return kept if not any(k in (Kernel.MKL, Kernel.MKL_WT) for k in kept) else chosen


def _bucket(rows: int) -> int:
    """Rows rounded up so that few distinct GEMM shapes occur: oneDNN keeps state per
    shape, and unbounded shapes grew resident memory by ~0.1 MB per request (measured)."""
    if rows <= 64:
        return rows
    step = 64 if rows <= 1024 else 256
    return -(-rows // step) * step


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + bias, q int8 [out, in] with one scale per output row.

    Up to `KERNEL_ROWS` rows (decode at small batch, where reading the weight is the cost)
    go through torch's weight-only kernel with bf16 activations (its fp32-activation path is
    slow on AVX2 CPUs: measured 5-20x slower); more rows (prefill, large batches: compute
    bound) dequantize the weight once per call and run the model dtype's GEMM."""

    KERNEL_ROWS = 4

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight_int8, self.scales = quantize_int8(linear.weight.detach())
        self.scales_bf16 = self.scales.to(torch.bfloat16)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] <= self.KERNEL_ROWS:
            act = flat.to(torch.bfloat16).contiguous()
            out = torch.ops.aten._weight_int8pack_mm(act, self.weight_int8, self.scales_bf16).to(x.dtype)
            if self.bias is not None:
                out = out + self.bias
        else:
            weight = self.weight_int8.to(x.dtype) * self.scales[:, None].to(x.dtype)
            out = torch.nn.functional.linear(flat, weight, self.bias)
        return out.view(*x.shape[:-1], self.out_features)

    @property
    def weight_nbytes(self) -> int:
        """Bytes a forward pass of at most KERNEL_ROWS rows reads of the weights."""
        bias = 0 if self.bias is None else self.bias.nbytes
        return self.weight_int8.nbytes + self.scales_bf16.nbytes + bias


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q [out, in] int8, scale [out] fp32), with |q| <= 127
    and weight ~= q * scale[:, None] (round to nearest)."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def _replace_linears(model: Any, make: Any, dtypes: tuple[torch.dtype, ...]) -> int:
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.dtype in dtypes and not child.weight.is_cuda:
                setattr(parent, name, make(child))
                replaced += 1
    return replaced


def use_cpu_linears(
    model: Any, measure: bool, batch_hint: int = 16, kernel_dir: str | None = None
) -> KernelTable:
    """Replaces every fp32 nn.Linear of a CPU model, and every bf16 one where oneDNN packs bf16
    weights on this CPU (AVX-512 or AVX-NE-CONVERT), by a `CpuLinear`: with `measure`, each row
    count through the kernel `tune` measured fastest here (the native one among them where it
    builds, in `kernel_dir`), otherwise oneDNN at every size. Returns the table the layers use."""
    dtypes = tuple(d for d in (torch.float32, torch.bfloat16) if onednn_packs(d))
    provisional = KernelTable()
    native = linear_kernel(kernel_dir) if measure else None
    _replace_linears(model, lambda linear: CpuLinear(linear, batch_hint, provisional, native), dtypes)
    layers = [m for m in model.modules() if isinstance(m, CpuLinear)]
    table = tune(layers)[0] if measure else provisional
    for layer in layers:
        layer.table = table
        if not table.uses_plain:
            layer.plain = None
        if not table.uses_native:
            layer.native_weight = None
    return table


@functools.cache
def onednn_packs(dtype: torch.dtype) -> bool:
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), 1)
    except RuntimeError:
        return False
    return True


def use_int8_linears(model: Any) -> int:
    """Replaces every fp32 and bf16 nn.Linear of a CPU model (the LM head included) by an
    int8 weight-only one; returns how many."""
    return _replace_linears(model, Int8Linear, (torch.float32, torch.bfloat16))
