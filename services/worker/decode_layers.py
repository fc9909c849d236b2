"""A decode step's decoder layers in one native call (csrc/decode_layers.c), for `Decoder`.

Between its matrix multiplies, a decode step through torch runs about 70 small operations a
layer (the rotation, K/V writes, views and copies, the kernels' Python wrappers, the act): at one
row on the 2-core machines, ~10 ms of a 30-45 ms step, for arithmetic worth well under a
millisecond. `DecodeLayers` runs every layer of such a step in C instead, with the kernels the
torch path would call (the same linear kernel the model's `KernelTable` picks for the step's row
count, the norm and paged-attention kernels), so its output is the torch path's bit for bit where
their elementwise functions agree (silu's `exp` is libm's here, torch's vectorised one there: they
may differ in the last bit). The embedding, the final norm and the LM head stay in torch.

It takes fp32 Llama-family models whose linear layers are WiCore's CPU ones with fused q/k/v
and gate/up projections and plain weights (`worker.cpu_kernels: auto`, the default, on
machines where an MKL or the native kernel wins at a decode step's row count), and decode steps
that attend through the paged kernel, with no shared prefix to merge and no A²CR probe on that
step. Other steps run layer by layer through torch, as before.
"""

from __future__ import annotations

import ctypes
import weakref
from typing import TYPE_CHECKING

import torch

from wicore.worker.cpu_kernels import CpuLinear, Kernel
from wicore.worker.native import (
    LAYERS_SIGNATURE,
    RowsLinear,
    blas_sgemm,
    decode_kernel,
    layers_library,
    linear_kernel,
    norm_kernel,
)
from wicore.worker.paged_attention import KVPool, StepMetadata

if TYPE_CHECKING:
    from wicore.worker.decoder import Decoder

_ptr, _int, _float = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
KERNEL_CODES = {Kernel.NATIVE: 0, Kernel.MKL: 1, Kernel.MKL_WT: 2}  # csrc/decode_layers.c's enum


class _Linear(ctypes.Structure):
    _fields_ = [("weight", _ptr), ("bias", _ptr), ("inputs", _int), ("outputs", _int)]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("input_norm", _ptr),
        ("post_norm", _ptr),
        ("qkv", _Linear),
        ("o", _Linear),
        ("gate_up", _Linear),
        ("down", _Linear),
        ("window", _int),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        ("layers", _int),
        ("hidden", _int),
        ("heads", _int),
        ("kv_heads", _int),
        ("head_dim", _int),
        ("intermediate", _int),
        ("eps", _float),
        ("scale", _float),
        ("linear", _ptr),
        ("norm", _ptr),
        ("attend", _ptr),
        ("sgemm", _ptr),
        ("layer", ctypes.POINTER(_Layer)),
    ]


def _fp32(t: torch.Tensor | None) -> bool:
    return t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous())


def _linear(module: object) -> _Linear | None:
    if (
        not isinstance(module, CpuLinear)
        or module.plain is None
        or not _fp32(module.plain)
        or not _fp32(module.bias)
    ):
        return None
    bias = None if module.bias is None else module.bias.data_ptr()
    return _Linear(module.plain.data_ptr(), bias, module.in_features, module.out_features)


class DecodeLayers:
    """Runs `Decoder`'s layers for a decode step in one call; `build` says whether it can."""

    def __init__(
        self, library: ctypes.CDLL, model: _Model, layers: ctypes.Array, linears: list[CpuLinear]
    ) -> None:
        self._fn = library.wicore_decode_layers
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = LAYERS_SIGNATURE
        self._scratch_size = library.wicore_decode_scratch
        self._scratch_size.restype = ctypes.c_int64
        self._scratch_size.argtypes = [_ptr, _int]
        self.model, self._layers = model, layers  # the struct points into the array: both kept
        self.table = linears[0].table
        self.native = all(linear.native is not None for linear in linears)
        self._linears = linears  # their weights are what the structs point to
        self._scratch = torch.empty(0)
        self._pool: tuple[weakref.ref[KVPool], ctypes.Array, ctypes.Array] | None = None

    @classmethod
    def build(cls, decoder: Decoder, kernel_dir: str | None = None) -> DecodeLayers | None:
        """The fused layers of `decoder`'s model, or None where a layer, a weight or a kernel is
        not what csrc/decode_layers.c takes (see the module docstring)."""
        if decoder.add_norm_kernel is None or not decoder.layers:
            return None
        scales = {float(layer.attn.scaling) for layer in decoder.layers}
        if len(scales) != 1:
            return None
        structs: list[_Layer] = []
        linears: list[CpuLinear] = []
        intermediate = None
        for layer in decoder.layers:
            if not (layer.qkv and layer.gate_up) or layer.q_norm is not None or layer.k_norm is not None:
                return None
            modules = (layer.attn.qkv_proj, layer.attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
            parts = [_linear(m) for m in modules]
            if any(p is None for p in parts) or not (_fp32(layer.input_norm) and _fp32(layer.post_norm)):
                return None
            gate, up = layer.gate_up
            if gate != up or intermediate not in (None, gate):
                return None
            intermediate = gate
            structs.append(
                _Layer(layer.input_norm.data_ptr(), layer.post_norm.data_ptr(), *parts, layer.window or 0)
            )
            linears += modules
        library = layers_library(kernel_dir)
        attend, linear, norm = decode_kernel(kernel_dir), linear_kernel(kernel_dir), norm_kernel(kernel_dir)
        if library is None or attend is None or linear is None or norm is None:
            return None
        array = (_Layer * len(structs))(*structs)
        model = _Model(
            len(structs),
            decoder.layers[0].input_norm.shape[0],
            decoder.heads,
            decoder.kv_heads,
            decoder.head_dim,
            intermediate,
            decoder.eps,
            scales.pop(),
            linear.address,
            norm.address,
            attend.address,
            blas_sgemm(),
            array,
        )
        return cls(library, model, array, linears)

    def kernel_for(self, rows: int) -> int | None:
        """The C kernel code for a step of `rows` rows: the one the model's linear layers would use
        through torch; None where that one is oneDNN's (not callable from C)."""
        kernel = self.table.pick(rows)
        if kernel is Kernel.NATIVE and not (self.native and rows <= RowsLinear.MAX_ROWS):
            return None  # CpuLinear runs oneDNN for these rows
        if kernel in (Kernel.MKL, Kernel.MKL_WT) and not self.model.sgemm:
            return None
        return KERNEL_CODES.get(kernel)

    def usable(self, meta: StepMetadata, tokens: int) -> int | None:
        """The kernel code when this step is one the fused layers run, else None."""
        if meta.decode is None or meta.probe_layer is not None or meta.pool.keys[0].dtype != torch.float32:
            return None
        if meta.cascade and any(part.prefix_ids is not None for part in meta.cascade):
            return None
        return self.kernel_for(tokens)

    def __call__(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: StepMetadata, kernel: int
    ) -> None:
        """h [T, hidden] fp32 contiguous, the embeddings: replaced by the last layer's hidden state.
        cos, sin [T, head_dim] contiguous; T rows, one decoding token per sequence."""
        rows = h.shape[0]
        need = int(self._scratch_size(ctypes.byref(self.model), rows))
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need, dtype=torch.float32)
        keys, values = self._pool_pointers(meta.pool)
        decode = meta.decode
        assert decode is not None
        status = self._fn(
            ctypes.byref(self.model),
            kernel,
            h.data_ptr(),
            rows,
            cos.data_ptr(),
            sin.data_ptr(),
            meta.slot_mapping.data_ptr(),
            keys,
            values,
            meta.pool.block_size,
            decode.tables.data_ptr(),
            decode.tables.shape[1],
            decode.starts.data_ptr(),
            decode.ends.data_ptr(),
            self._scratch.data_ptr(),
            torch.get_num_threads(),
        )
        if status:
            raise RuntimeError(f"fused decode layers: a kernel returned {status}")

    def _pool_pointers(self, pool: KVPool) -> tuple[ctypes.Array, ctypes.Array]:
        """Each layer's key and value pool, as C arrays (built once per pool)."""
        if self._pool is None or self._pool[0]() is not pool:
            pointers = ctypes.c_void_p * len(pool.keys)
            keys = pointers(*(t.data_ptr() for t in pool.keys))
            values = pointers(*(t.data_ptr() for t in pool.values))
            self._pool = (weakref.ref(pool), keys, values)
        return self._pool[1], self._pool[2]
