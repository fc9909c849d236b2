"""Attention over the paged KV cache, plugged into transformers' attention interface.

One engine step runs every scheduled sequence in one packed forward pass:

    packed tokens  [ a0 a1 a2 a3 | b7 | c4 c5 ]      (a: prefill chunk, b: decode, c: chunk)
    positions      [  0  1  2  3 |  7 |  4  5 ]
    slot_mapping   where each new token's K/V is written: block_table[pos // B] * B + pos % B

Each layer's `PagedCache.update` writes the new K/V into the pool at `slot_mapping`
(post-RoPE, exactly what the model computed). `paged_attention` then scatters the
packed queries into a padded [S, H, Qmax, D] grid, gathers every sequence's keys
and values 0..kv_len-1 from the pool into [S, Hkv, Lmax, D] (whole blocks through
the block tables, much cheaper than one index per token), and runs SDPA with
a mask that is causal by absolute position, hides padding, and for sliding-window
layers (Gemma 3, Mistral) hides keys at or beyond `window` positions back.
Masks and index tensors are built once per step and shared by all layers.

That gather copies a prefix shared by many sequences once per sequence; the `cascade`
backend (cascade.py) reads it once for all of them, and the `paged` backend (the default on
CPU) also reads a decode step's own keys in place, through a kernel built for this CPU
(native.py). `gather` is the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from wicore.worker.cascade import DecodeRows, Part, cascade_attention, paged_decode_attention

ATTENTION_NAME = "wicore_paged"


class KVPool:
    """Per-layer K and V tensors of shape [num_blocks * block_size, kv_heads, head_dim]
    (rows = slots); `blocks(layer)` views them as [num_blocks, block_size, kv_heads, head_dim]."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        slots = num_blocks * block_size
        self.block_size = block_size
        self.keys = [
            torch.zeros(slots, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(num_layers)
        ]
        self.values = [
            torch.zeros(slots, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(num_layers)
        ]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def blocks(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.keys[layer], self.values[layer]
        shape = (-1, self.block_size, *k.shape[1:])
        return k.view(shape), v.view(shape)

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        itemsize = torch.empty(0, dtype=dtype).element_size()
        return 2 * num_layers * block_size * kv_heads * head_dim * itemsize


@dataclass(slots=True)
class StepMetadata:
    """Index tensors and masks for one packed forward pass, shared by all layers."""

    pool: KVPool
    slot_mapping: torch.Tensor  # [T] where each new token's K/V goes
    packed_to_grid: torch.Tensor  # [T] position of each packed token in the flat [S * Qmax] grid
    block_tables: torch.Tensor  # [S, max_blocks] block ids of each sequence (padding -> block 0)
    flat_tables: torch.Tensor  # block_tables.flatten()
    query_positions: torch.Tensor  # [S, Qmax] absolute position of each grid query (padding -> -1)
    kv_lens: torch.Tensor  # [S]
    num_seqs: int
    max_query: int
    max_kv: int  # Lmax: keys gathered per sequence (whole blocks, then cut to this)
    probe_layer: int | None = None  # measure attention on this layer (A²CR), None: not this step
    key_mass: torch.Tensor | None = None  # [S, Lmax] attention mass per key, set by the probe
    # The probe's queries: query_positions with speculative proposals' set to -1 (not counted:
    # they may be rejected); None: every real query counts.
    probe_positions: torch.Tensor | None = None
    cascade: list[Part] | None = None  # shared prefixes to read once (cascade backend); None: gather all
    decode: DecodeRows | None = None  # a decode step for the native kernel (paged backend)
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def mask(self, window: int | None) -> torch.Tensor:
        """[S, 1, Qmax, Lmax] boolean: True where a query may attend a key."""
        cached = self._masks.get(window)
        if cached is not None:
            return cached
        key_pos = torch.arange(self.max_kv, device=self.block_tables.device)
        q = self.query_positions[:, :, None]
        allowed = (key_pos[None, None, :] <= q) & (key_pos[None, None, :] < self.kv_lens[:, None, None])
        if window is not None:
            allowed &= key_pos[None, None, :] > q - window
        # Padding queries attend key 0 so SDPA never sees an all-masked row (their output is dropped).
        allowed[:, :, 0] |= self.query_positions < 0
        mask = allowed[:, None, :, :]
        self._masks[window] = mask
        return mask


class PagedCache:
    """What the model sees as `cache=`: writes each layer's new K/V into the pool."""

    is_compileable = False

    def __init__(self, meta: StepMetadata) -> None:
        self.meta = meta

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states: [1, Hkv, T, D] -> [T, Hkv, D] rows of the pool
        pool, slots = self.meta.pool, self.meta.slot_mapping
        pool.keys[layer_idx].index_copy_(0, slots, key_states[0].transpose(0, 1))
        pool.values[layer_idx].index_copy_(0, slots, value_states[0].transpose(0, 1))
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    wicore_meta: StepMetadata | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [1, H, T, D] (packed) -> output [1, T, H, D].

    `sliding_window` is what Mistral, Qwen2/3 and Gemma 3 layers pass (None: full attention)."""
    meta = wicore_meta
    if meta is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention needs the engine's step metadata")
    _, heads, tokens, head_dim = query.shape
    s, qmax = meta.num_seqs, meta.max_query
    packed = query[0].transpose(0, 1)  # [T, H, D]
    if qmax == 1 and tokens == s:  # decode only: the packed order is the grid order
        grid = packed.unsqueeze(1)
    else:
        grid = packed.new_zeros(s * qmax, heads, head_dim)
        grid.index_copy_(0, meta.packed_to_grid, packed)
        grid = grid.view(s, qmax, heads, head_dim)
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    scale = scaling if scaling is not None else head_dim**-0.5
    keys: torch.Tensor | None = None
    if meta.decode is not None:  # one query per sequence, read in place by the native kernel
        out = paged_decode_attention(packed, meta.decode, meta.pool, layer, scale, sliding_window)
    elif meta.cascade is not None:
        out = cascade_attention(grid, meta.cascade, meta.pool, layer, scale, sliding_window)
        out = out.reshape(s * qmax, heads, head_dim)
    else:
        keys, values = gather(meta, layer)
        out = F.scaled_dot_product_attention(
            grid.transpose(1, 2),
            keys,
            values,
            attn_mask=meta.mask(sliding_window),
            scale=scale,
            enable_gqa=keys.shape[1] != heads,
        )  # [S, H, Qmax, D]
        out = out.transpose(1, 2).reshape(s * qmax, heads, head_dim)
    if layer == meta.probe_layer:
        if keys is None:
            keys, _ = gather(meta, layer)
        mask = meta.mask(sliding_window)
        counted = meta.probe_positions if meta.probe_positions is not None else meta.query_positions
        meta.key_mass = key_mass(grid.transpose(1, 2), keys, mask, counted, scale)
    if not (qmax == 1 and tokens == s):
        out = out.index_select(0, meta.packed_to_grid)
    return out.unsqueeze(0), None


def gather(meta: StepMetadata, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sequence's keys and values 0..Lmax-1, whole blocks at a time:
    [S, max_blocks, B, Hkv, D] -> [S, Hkv, Lmax, D] (index_select over the flat table is ~4x
    faster than advanced indexing here)."""
    k_blocks, v_blocks = meta.pool.blocks(layer)
    gathered = (meta.num_seqs, -1, *k_blocks.shape[2:])
    keys = k_blocks.index_select(0, meta.flat_tables).view(gathered)[:, : meta.max_kv].transpose(1, 2)
    values = v_blocks.index_select(0, meta.flat_tables).view(gathered)[:, : meta.max_kv].transpose(1, 2)
    return keys, values


def key_mass(
    query: torch.Tensor,
    keys: torch.Tensor,
    mask: torch.Tensor,
    query_positions: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    """[S, Lmax]: the attention probability each key receives, summed over heads and over the
    real (non-padding) queries of its sequence: the probe behind A²CR's A(b) (wicore.kv.attention).

    query [S, H, Qmax, D], keys [S, Hkv, Lmax, D], mask [S, 1, Qmax, Lmax].
    """
    heads, kv_heads = query.shape[1], keys.shape[1]
    if kv_heads != heads:
        keys = keys.repeat_interleave(heads // kv_heads, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query.float(), keys.float().transpose(-1, -2)) * scale
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)  # [S, H, Qmax, Lmax]
    real = (query_positions >= 0).to(probs.dtype)[:, None, :, None]
    return (probs * real).sum(dim=(1, 2))


def register() -> str:
    """Registers the attention function. No mask function is registered on purpose:
    transformers then skips building masks, and `StepMetadata.mask` builds ours."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention)
    return ATTENTION_NAME
