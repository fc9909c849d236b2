"""A decode step's decoder layers in native code (csrc/decode_layers.c), for `Decoder`.

Between its matrix multiplies, a decode step through torch runs about 70 small operations a
layer (the rotation, K/V writes, views and copies, the kernels' Python wrappers, the act): at one
row on the 2-core machines, ~10 ms of a 30-45 ms step, for arithmetic worth well under a
millisecond. Two ways round it, both with the kernels the torch path calls (so the result is the
torch path's: the same linear kernel the model's `KernelTable` picks for the step's row count, the
same norm and paged-attention kernels; only silu's `exp` is computed here, and may differ from
torch's in the last bit):

- where that linear kernel is one C can call (WiCore's native one, or MKL's sgemm as torch calls
  it for `x @ W.T` and `W @ x.T`), every layer in one call (`DecodeLayers.__call__`);
- where it is oneDNN's (packed weights, reachable only through torch: usually above 32-64 rows),
  torch runs the linear layers and one call each does what lies between them: the rotation, the
  K/V writes and attention (`attend`), and silu(gate) * up (`silu_mul`).

Either way attention reads each sequence's own keys in place, and a prefix that sequences share
once for all of them (csrc/paged_attention.c's two kernels, merged by log-sum-exp).

The embedding, the final norm and the LM head stay in torch. It takes fp32 Llama-family models
whose linear layers are WiCore's CPU ones (`worker.cpu_kernels: auto` or `onednn`) with fused
q/k/v and gate/up projections and no per-head q/k norms (Qwen3's), and decode steps that attend
through the paged kernel with no A²CR probe; other steps run layer by layer through torch, as
before.
"""

from __future__ import annotations

import ctypes
import weakref
from typing import TYPE_CHECKING, Any

import torch

from wicore.worker.cascade import PrefixTables
from wicore.worker.cpu_kernels import CpuLinear, Kernel
from wicore.worker.native import (
    LAYERS_SIGNATURE,
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
# wicore_decode_attend(model, layer, qkv, rows, cos, sin, slots, keys, values, block_size, tables,
#                      table_stride, starts, ends, prefixes, q, out, lse, threads)
ATTEND_SIGNATURE: list[Any] = [_ptr, _int, _ptr, _int, _ptr, _ptr, _ptr, _ptr, _ptr, _int, _ptr]
ATTEND_SIGNATURE += [ctypes.c_int64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _int]
KERNEL_CODES = {Kernel.NATIVE: 0, Kernel.MKL: 1, Kernel.MKL_WT: 2}  # csrc/decode_layers.c's enum


class _Prefixes(ctypes.Structure):
    _fields_ = [
        ("groups", _int),
        ("member_offsets", _ptr),
        ("members", _ptr),
        ("block_offsets", _ptr),
        ("blocks", _ptr),
    ]


class _Linear(ctypes.Structure):
    _fields_ = [("weight", _ptr), ("packed", _ptr), ("bias", _ptr), ("inputs", _int), ("outputs", _int)]


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
        ("prefix", _ptr),
        ("sgemm", _ptr),
        ("layer", ctypes.POINTER(_Layer)),
    ]


def _fp32(t: torch.Tensor | None) -> bool:
    return t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous())


def _linear(module: object) -> _Linear | None:
    """The C view of a CpuLinear: its plain weight and the native kernel's packed one (each NULL
    where no row count's kernel keeps it: then only the segments run); None for any other layer."""
    if not isinstance(module, CpuLinear) or not _fp32(module.bias):
        return None
    plain = module.plain if module.plain is not None and _fp32(module.plain) else None
    packed = (
        module.native_weight if module.native_weight is not None and _fp32(module.native_weight) else None
    )
    return _Linear(
        None if plain is None else plain.data_ptr(),
        None if packed is None else packed.data_ptr(),
        None if module.bias is None else module.bias.data_ptr(),
        module.in_features,
        module.out_features,
    )


class DecodeLayers:
    """Runs `Decoder`'s layers for a decode step natively (see the module docstring); `build` says
    whether it can."""

    def __init__(
        self, library: ctypes.CDLL, model: _Model, layers: ctypes.Array, linears: list[CpuLinear]
    ) -> None:
        self._fn = library.wicore_decode_layers
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = LAYERS_SIGNATURE
        self._scratch_size = library.wicore_decode_scratch
        self._scratch_size.restype = ctypes.c_int64
        self._scratch_size.argtypes = [_ptr, _int]
        self._attend = library.wicore_decode_attend
        self._attend.restype = ctypes.c_int
        self._attend.argtypes = ATTEND_SIGNATURE
        self._silu_mul = library.wicore_silu_mul
        self._silu_mul.restype = None
        self._silu_mul.argtypes = [_ptr, _int, _int, _ptr]
        self.model, self._layers = model, layers  # the struct points into the array: both kept
        self.table = linears[0].table
        self.native = all(
            linear.native is not None and linear.native_weight is not None for linear in linears
        )
        self.plain = all(
            layer.qkv.weight and layer.o.weight and layer.gate_up.weight and layer.down.weight
            for layer in layers
        )
        self._linears = linears  # their weights are what the structs point to
        self._scratch = torch.empty(0)
        self._scratch_sizes: dict[int, int] = {}
        self._pool: tuple[weakref.ref[KVPool], ctypes.Array, ctypes.Array] | None = None
        self._prefixes: tuple[PrefixTables, _Prefixes] | None = None  # this step's, as the C struct

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
            attend.prefix_address,
            blas_sgemm(),
            array,
        )
        return cls(library, model, array, linears)

    def kernel_for(self, rows: int) -> int | None:
        """The C kernel code for a step of `rows` rows: the one the model's linear layers would use
        through torch; None where that one is oneDNN's (not callable from C)."""
        kernel = self.table.pick(rows)
        if kernel is Kernel.NATIVE and not self.native:
            return None  # CpuLinear runs oneDNN for these rows
        if kernel in (Kernel.MKL, Kernel.MKL_WT) and not (self.plain and self.model.sgemm):
            return None
        return KERNEL_CODES.get(kernel)

    @staticmethod
    def usable(meta: StepMetadata) -> bool:
        """Whether this step is one the native code runs: a decode step through the paged kernel,
        fp32 K/V, no probe."""
        return (
            meta.decode is not None and meta.probe_layer is None and meta.pool.keys[0].dtype == torch.float32
        )

    def attend(
        self, layer: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: StepMetadata
    ) -> torch.Tensor:
        """What lies between a layer's q/k/v and output projections, in one call: qkv [T, (H + 2 Hkv)
        * D] -> the rotated queries attended over the pool after writing the rotated keys and the
        values and merging in each shared prefix, [T, H * D] (a view of scratch, valid until the next
        call)."""
        rows = qkv.shape[0]
        cos, sin = cos.contiguous(), sin.contiguous()
        width = self.model.heads * self.model.head_dim
        scratch = self._scratch_for(rows * (2 * width + self.model.heads + self.model.intermediate))
        q, out = scratch[: rows * width], scratch[rows * width : 2 * rows * width]
        lse = scratch[2 * rows * width : rows * (2 * width + self.model.heads)]
        keys, values = self._pool_pointers(meta.pool)
        qkv = qkv.contiguous()
        status = self._attend(
            ctypes.byref(self.model),
            layer,
            qkv.data_ptr(),
            rows,
            *self._step_args(cos, sin, meta, keys[layer], values[layer]),
            q.data_ptr(),
            out.data_ptr(),
            lse.data_ptr(),
            torch.get_num_threads(),
        )
        if status:
            raise RuntimeError(f"fused decode attention: a kernel returned {status}")
        return out.view(rows, width)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for gate_up [T, 2 I] -> [T, I] (a view of scratch, after `attend`'s)."""
        rows, inter = gate_up.shape[0], self.model.intermediate
        width = self.model.heads * self.model.head_dim
        start = rows * (2 * width + self.model.heads)
        act = self._scratch_for(start + rows * inter)[start : start + rows * inter]
        gate_up = gate_up.contiguous()
        self._silu_mul(gate_up.data_ptr(), rows, inter, act.data_ptr())
        return act.view(rows, inter)

    def _scratch_for(self, floats: int) -> torch.Tensor:
        if self._scratch.numel() < floats:
            self._scratch = torch.empty(floats, dtype=torch.float32)
        return self._scratch

    def __call__(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: StepMetadata, kernel: int
    ) -> None:
        """h [T, hidden] fp32 contiguous, the embeddings: replaced by the last layer's hidden state.
        cos, sin [T, head_dim]; T rows, one decoding token per sequence."""
        if not (h.dtype == torch.float32 and h.is_contiguous()):
            raise ValueError("fused decode layers: h must be fp32 and contiguous (it is updated in place)")
        rows = h.shape[0]
        cos, sin = cos.contiguous(), sin.contiguous()
        if rows not in self._scratch_sizes:  # per row count, not per step
            self._scratch_sizes[rows] = int(self._scratch_size(ctypes.byref(self.model), rows))
        scratch = self._scratch_for(self._scratch_sizes[rows])
        keys, values = self._pool_pointers(meta.pool)
        status = self._fn(
            ctypes.byref(self.model),
            kernel,
            h.data_ptr(),
            rows,
            *self._step_args(cos, sin, meta, keys, values),
            scratch.data_ptr(),
            torch.get_num_threads(),
        )
        if status:
            raise RuntimeError(f"fused decode layers: a kernel returned {status}")

    def _step_args(
        self, cos: torch.Tensor, sin: torch.Tensor, meta: StepMetadata, keys: Any, values: Any
    ) -> tuple:
        """The arguments both C entry points take after the rows, in their order: the rotation,
        the slots, the pool (`keys`, `values`: one layer's or every layer's), its block tables,
        the shared prefixes (their struct built once a step, not once a layer)."""
        decode = meta.decode
        assert decode is not None
        prefixes = None
        if decode.prefixes is not None:
            if self._prefixes is None or self._prefixes[0] is not decode.prefixes:
                self._prefixes = (decode.prefixes, _Prefixes(*decode.prefixes.arguments()))
            prefixes = ctypes.byref(self._prefixes[1])
        return (
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
            prefixes,
        )

    def _pool_pointers(self, pool: KVPool) -> tuple[ctypes.Array, ctypes.Array]:
        """Each layer's key and value pool, as C arrays (built once per pool)."""
        if self._pool is None or self._pool[0]() is not pool:
            pointers = ctypes.c_void_p * len(pool.keys)
            keys = pointers(*(t.data_ptr() for t in pool.keys))
            values = pointers(*(t.data_ptr() for t in pool.values))
            self._pool = (weakref.ref(pool), keys, values)
        return self._pool[1], self._pool[2]
