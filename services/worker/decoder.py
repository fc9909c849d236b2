"""WiCore's own forward pass for Llama-architecture decoders (Llama, Mistral, Qwen2, Qwen3).

transformers' modules are written for every use (training, hooks, any cache, any mask),
and a decode step pays for that generality in small operations: SmolLM2 took ~126 top-level
torch calls per layer through them (views, transposes, casts, the rotary embedding's
`rotate_half` per tensor, the cache's and the attention interface's reshuffles), about as
much time at batch 1 as its matrix multiplies. `Decoder` runs the same arithmetic, in the
same order, on the model's own parameters and linear layers (no copy of any weight), with
what a packed, paged step needs and nothing else:

    h = embed(ids)
    per layer:  x = rms_norm(h);  q, k, v = x @ Wq, x @ Wk, x @ Wv   [T, heads, D]
                (Qwen3: q, k = rms_norm(q), rms_norm(k) over D);  q, k = rope(q, k)
                pool[layer][slots] = k, v;  a = paged_attention(q)  (cascade.py / gather)
                h += a @ Wo;  x = rms_norm(h);  h += down(act(gate(x)) * up(x))
    logits = lm_head(rms_norm(h[rows]))

Each operation is the one transformers performs (RMS norms in float32 then cast,
`q·cos + rotate_half(q)·sin` elementwise, residual sums), so with the model's own kernels
(`worker.cpu_kernels: default`) greedy output is bit for bit `generate`'s: the tests hold
it to that. `worker.model_impl: transformers` runs the model's modules instead (every
family; Gemma 3 always, which has no `Decoder`).

With the CPU's tuned or int8 linear layers (anything but `worker.cpu_kernels: default`),
`fuse_projections` first joins each layer's q, k and v projections into one layer and its
gate and up projections into another, as vLLM's QKV and merged-column layers do: 4 matrix
multiplies per layer instead of 7, each over a taller weight (SmolLM2's linear layers at
one row: 16.9 ms a step instead of 19.3; at 16 rows 29.9 instead of 33.6, measured here).
Under those kernels a decode step's layers run in native code where they can (decode_layers.py):
every layer in one call, or the linear layers in torch and one call for what lies between.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wicore.worker.cpu_kernels import CpuLinear
from wicore.worker.decode_layers import DecodeLayers
from wicore.worker.native import norm_kernel
from wicore.worker.paged_attention import StepMetadata, paged_attention

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm: normalised in float32, cast back, then scaled."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)  # fused, and bit for bit the same
    return weight * F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin for x [T, heads, D], cos/sin [T, 1, D] (both halves equal):
    elementwise the same sums transformers computes, in fewer operations."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[..., :half], sin[..., :half]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


class Part(nn.Module):
    """One projection of a fused layer, for transformers' modules, which call q_proj, k_proj and
    v_proj one by one: it runs the fused layer (whatever replaced it: looked up on each call) and
    keeps output features [start, stop). The Decoder calls the fused layer once instead."""

    def __init__(self, owner: nn.Module, fused: str, start: int, stop: int) -> None:
        super().__init__()
        self.owner = weakref.ref(owner)  # not a submodule (the fused layer is the owner's), no cycle
        self.fused, self.start, self.stop = fused, start, stop
        self.out_features = stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.owner(), self.fused)(x)[..., self.start : self.stop]


def _join(owner: nn.Module, names: tuple[str, ...], fused: str) -> bool:
    """Replaces the linear layers `names` of `owner` by one, `fused`, and each by its `Part`."""
    parts = [getattr(owner, name) for name in names]
    if not all(type(p) is nn.Linear for p in parts) or len({p.bias is None for p in parts}) != 1:
        return False
    weight = torch.cat([p.weight.detach() for p in parts])
    layer = nn.Linear(parts[0].in_features, weight.shape[0], bias=parts[0].bias is not None)
    layer = layer.to(device=weight.device, dtype=weight.dtype).requires_grad_(False)
    layer.weight.data = weight
    if layer.bias is not None:
        layer.bias.data = torch.cat([p.bias.detach() for p in parts])
    setattr(owner, fused, layer)
    start = 0
    for name, part in zip(names, parts, strict=True):
        setattr(owner, name, Part(owner, fused, start, start + part.out_features))
        start += part.out_features
    return True


def fuse_projections(model: Any) -> int:
    """Joins every layer's q/k/v projections into `qkv_proj` and gate/up into `gate_up_proj`
    (transformers' modules still run, through `Part`s); returns how many layers were joined."""
    joined = 0
    for layer in model.model.layers:
        joined += _join(layer.self_attn, ("q_proj", "k_proj", "v_proj"), "qkv_proj")
        joined += _join(layer.mlp, ("gate_proj", "up_proj"), "gate_up_proj")
    return joined


@dataclass(frozen=True, slots=True)
class Layer:
    attn: Any  # the model's attention module: its projections, layer_idx for the attention
    mlp: Any
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    q_norm: torch.Tensor | None  # Qwen3's per-head norms
    k_norm: torch.Tensor | None
    window: int | None  # sliding-window attention: keys this many positions back are hidden
    qkv: tuple[int, int, int] | None  # output features of q, k, v in a fused qkv_proj; None: apart
    gate_up: tuple[int, int] | None  # of gate and up in a fused gate_up_proj


def _split(owner: nn.Module, names: tuple[str, ...], fused: str) -> Any:
    """The output features of each of `names` when `fuse_projections` joined them, else None."""
    if not hasattr(owner, fused):
        return None
    return tuple(getattr(owner, name).out_features for name in names)


class Decoder:
    """Next-token logits for the packed tokens of one engine step (see the module docstring)."""

    def __init__(self, model: Any, kernel_dir: str | None = None) -> None:
        inner = model.model
        config = model.config
        self.eps = float(config.rms_norm_eps)
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.final_norm = inner.norm.weight
        self.lm_head = model.lm_head
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.layers = []
        for layer in inner.layers[: config.num_hidden_layers]:
            attn = layer.self_attn
            q_norm = getattr(attn, "q_norm", None)
            k_norm = getattr(attn, "k_norm", None)
            window = getattr(attn, "sliding_window", getattr(config, "sliding_window", None))
            self.layers.append(
                Layer(
                    attn=attn,
                    mlp=layer.mlp,
                    input_norm=layer.input_layernorm.weight,
                    post_norm=layer.post_attention_layernorm.weight,
                    q_norm=None if q_norm is None else q_norm.weight,
                    k_norm=None if k_norm is None else k_norm.weight,
                    window=window,
                    qkv=_split(attn, ("q_proj", "k_proj", "v_proj"), "qkv_proj"),
                    gate_up=_split(layer.mlp, ("gate_proj", "up_proj"), "gate_up_proj"),
                )
            )
        # Where the linear layers are WiCore's fp32 CPU ones (worker.cpu_kernels other than
        # default), bit-equality with transformers is given up already: the residual sums and norms
        # then go through the native kernel too (one call each instead of ~9 torch operations).
        # Not under int8, whose layers round their inputs to bf16: a last-bit difference in a norm
        # would flip that rounding, and the engine would no longer match `generate` over the
        # same int8 model (test_int8_weights holds it to that).
        fast = any(isinstance(m, CpuLinear) for m in model.modules())
        use_native = fast and self.final_norm.dtype == torch.float32 and self.final_norm.device.type == "cpu"
        self.add_norm_kernel = norm_kernel(kernel_dir) if use_native else None
        # A decode step's layers in one native call, where the model and kernels allow it.
        self.fused = DecodeLayers.build(self, kernel_dir) if use_native else None

    @staticmethod
    def supports(model: Any) -> bool:
        config = model.config
        return (
            getattr(config, "model_type", None) in FAMILIES
            and getattr(config, "hidden_act", None) == "silu"
            and not getattr(config, "pretraining_tp", 1) > 1
        )

    def __call__(
        self, ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata, rows: torch.Tensor
    ) -> torch.Tensor:
        """ids, positions [T]; rows: the packed indices to compute logits for -> [R, vocab]."""
        h = self.embed(ids)  # [T, hidden]
        cos, sin = self.rotary(h, positions[None])  # [1, T, D]
        if self.fused is not None and self.fused.usable(meta):
            kernel = self.fused.kernel_for(ids.shape[0])
            if kernel is not None:
                self.fused(h, cos[0], sin[0], meta, kernel)  # every layer in one call, in place
            else:
                h = self.layers_in_segments(h, cos[0], sin[0], meta)
        else:
            h = self.layers_through_torch(h, cos[0, :, None, :], sin[0, :, None, :], meta)
        h = rms_norm(h.index_select(0, rows), self.final_norm, self.eps)
        return self.lm_head(h)

    def layers_in_segments(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: StepMetadata
    ) -> torch.Tensor:
        """A decode step whose linear layers run oneDNN (which C cannot call): torch calls the linear
        layers, and one native call each does what lies between (`DecodeLayers.attend`, `silu_mul`)."""
        fused = self.fused
        assert fused is not None
        delta: torch.Tensor | None = None
        for i, layer in enumerate(self.layers):
            h, x = self.add_norm(h, delta, layer.input_norm)
            out = fused.attend(i, layer.attn.qkv_proj(x), cos, sin, meta)
            h, x = self.add_norm(h, layer.attn.o_proj(out), layer.post_norm)
            delta = layer.mlp.down_proj(fused.silu_mul(layer.mlp.gate_up_proj(x)))
        return h if delta is None else h + delta

    def layers_through_torch(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: StepMetadata
    ) -> torch.Tensor:
        """The decoder layers, operation by operation: h [T, hidden]; cos, sin [T, 1, D]."""
        tokens = h.shape[0]
        pool, slots, eps = meta.pool, meta.slot_mapping, self.eps
        heads, kv_heads, d = self.heads, self.kv_heads, self.head_dim
        delta: torch.Tensor | None = None  # the last sublayer's output, not yet added to h
        for i, layer in enumerate(self.layers):
            attn = layer.attn
            h, x = self.add_norm(h, delta, layer.input_norm)
            if layer.qkv and layer.q_norm is None:  # q and k side by side: one rotation for both
                qkv = attn.qkv_proj(x)
                qk = rope(qkv[:, : (heads + kv_heads) * d].view(tokens, heads + kv_heads, d), cos, sin)
                q, k = qk[:, :heads], qk[:, heads:]
                v = qkv[:, (heads + kv_heads) * d :].view(tokens, kv_heads, d)
            else:
                if layer.qkv:
                    q, k, v = attn.qkv_proj(x).split(layer.qkv, dim=-1)
                else:
                    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
                q, k, v = q.view(tokens, heads, d), k.view(tokens, kv_heads, d), v.view(tokens, kv_heads, d)
                if layer.q_norm is not None and layer.k_norm is not None:
                    q, k = rms_norm(q, layer.q_norm, eps), rms_norm(k, layer.k_norm, eps)
                q, k = rope(q, cos, sin), rope(k, cos, sin)
            pool.keys[i].index_copy_(0, slots, k)
            pool.values[i].index_copy_(0, slots, v)
            out, _ = paged_attention(
                attn,
                q.transpose(0, 1)[None],
                k,
                v,
                None,
                scaling=attn.scaling,
                sliding_window=layer.window,
                wicore_meta=meta,
            )  # [1, T, heads, D]
            h, x = self.add_norm(h, attn.o_proj(out.reshape(tokens, heads * d)), layer.post_norm)
            mlp = layer.mlp
            if layer.gate_up:
                gate, up = mlp.gate_up_proj(x).split(layer.gate_up, dim=-1)
            else:
                gate, up = mlp.gate_proj(x), mlp.up_proj(x)
            delta = mlp.down_proj(F.silu(gate) * up)
        if delta is not None:
            h = h + delta
        return h

    def add_norm(
        self, h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + delta, rms_norm(h + delta) * weight): transformers' arithmetic, or the native
        kernel's (which adds in place: h is the decoder's own running sum)."""
        if self.add_norm_kernel is not None:
            return h, self.add_norm_kernel(h, delta, weight, self.eps)
        if delta is not None:
            h = h + delta
        return h, rms_norm(h, weight, self.eps)
