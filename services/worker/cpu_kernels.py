"""Linear layers for CPU workers: oneDNN-packed fp32/bf16 weights, and int8 weights.

`torch.ops.mkldnn._linear_pointwise` with a weight reordered once into oneDNN's
blocked layout runs the small-M GEMMs of a decode step markedly faster than
the default MKL `sgemm` path here (measured: a 16x576 @ 576x3072 GEMM 0.56 ms vs
0.94 ms; the 49152-row LM head 20 ms vs 32 ms). Its results differ from MKL's in
the last bits, so greedy output can differ from `model.generate` at near-ties:
`worker.cpu_kernels: default` keeps the model's own kernels, bit for bit.

`worker.weight_quant: int8` stores every linear layer's weight as int8 with one
symmetric scale per output channel (`Int8Linear`) and multiplies through torch's own
weight-only kernel (`aten._weight_int8pack_mm`): a decode step reads a quarter of the
fp32 bytes; activations stay in the model's dtype.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn


class OneDnnLinear(nn.Module):
    """A linear layer through oneDNN with its weight prepacked for `batch_hint` rows.

    Up to `MKL_ROWS` rows (decode at batch 1 or 2) an fp32 layer multiplies its plain weight
    with MKL instead: there MKL streams the weight near memory bandwidth and the packed kernel
    did not (SmolLM2's linear layers at one row: 27.7 ms vs 31.0 ms a step on the AMX machine,
    and a whole batch-1 decode step 42 ms vs 52-76 ms). An fp32 layer so keeps both copies of
    its weight (`worker.cpu_kernels: default` keeps one). bf16 stays on oneDNN, faster there
    at every size."""

    MKL_ROWS = 2

    def __init__(self, linear: nn.Linear, batch_hint: int) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.plain = weight if weight.dtype == torch.float32 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        rows = flat.shape[0]
        if rows <= self.MKL_ROWS and self.plain is not None:
            return torch.nn.functional.linear(x, self.plain, self.bias)
        bucket = _bucket(rows)
        if bucket != rows:
            flat = torch.nn.functional.pad(flat, (0, 0, 0, bucket - rows))
        elif not flat.is_contiguous():
            flat = flat.contiguous()
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out[:rows].view(*x.shape[:-1], self.out_features)

    @property
    def weight_nbytes(self) -> int:
        """Bytes a forward pass reads of the weights (one of the two copies)."""
        bias = 0 if self.bias is None else self.bias.nbytes
        return self.in_features * self.out_features * self.packed.element_size() + bias


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


def use_onednn_linears(model: Any, batch_hint: int = 16) -> int:
    """Replaces every fp32 nn.Linear of a CPU model, and every bf16 one where oneDNN packs bf16
    weights on this CPU (AVX-512 or AVX-NE-CONVERT); returns how many."""
    dtypes = tuple(d for d in (torch.float32, torch.bfloat16) if onednn_packs(d))
    return _replace_linears(model, lambda linear: OneDnnLinear(linear, batch_hint), dtypes)


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
