"""Copying whole KV blocks between the device pool and host tensors, for offload and reload.

    pool (per layer)  keys[slots, Hkv, D], values[slots, Hkv, D], slots = blocks * B
    host block        [layers, 2, B, Hkv, D]     dim 1: 0 = keys, 1 = values (wicore.kv.block)

`read_blocks` returns a copy (the pool blocks may be reused right after);
`write_blocks` overwrites pool blocks with host tensors (cast to the pool's dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wicore.kv.attention import Observation
from wicore.kv.hashing import BlockHash
from wicore.worker.paged_attention import KVPool


@dataclass(frozen=True, slots=True)
class Spilled:
    """A block leaving the device pool: its host copy and where it sat in its sequence."""

    block_hash: BlockHash
    position: int  # the block's index in its sequence's chain
    kv: torch.Tensor  # [layers, 2, B, Hkv, D]
    observation: Observation | None = None  # the device's last attention measurement of it


def read_blocks(pool: KVPool, block_ids: list[int]) -> torch.Tensor:
    """[n, layers, 2, B, Hkv, D] on the CPU: a copy of the pool blocks `block_ids`."""
    layers = len(pool.keys)
    k0, _ = pool.blocks(0)
    out = torch.empty((len(block_ids), layers, 2, *k0.shape[1:]), dtype=k0.dtype)
    index = torch.tensor(block_ids, dtype=torch.long, device=k0.device)
    for layer in range(layers):
        keys, values = pool.blocks(layer)
        out[:, layer, 0] = keys.index_select(0, index).cpu()
        out[:, layer, 1] = values.index_select(0, index).cpu()
    return out


def write_blocks(pool: KVPool, block_ids: list[int], kv: torch.Tensor) -> None:
    """Writes kv [n, layers, 2, B, Hkv, D] into the pool blocks `block_ids`."""
    k0, _ = pool.blocks(0)
    expected = (len(block_ids), len(pool.keys), 2, *k0.shape[1:])
    if tuple(kv.shape) != expected:
        raise ValueError(f"kv: expected shape {expected}, got {tuple(kv.shape)}")
    index = torch.tensor(block_ids, dtype=torch.long, device=k0.device)
    kv = kv.to(device=k0.device, dtype=k0.dtype)
    for layer in range(len(pool.keys)):
        keys, values = pool.blocks(layer)
        keys.index_copy_(0, index, kv[:, layer, 0])
        values.index_copy_(0, index, kv[:, layer, 1])
