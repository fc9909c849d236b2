"""How many KV blocks a GPU worker preallocates (a CPU worker's budget is worker.kv_cache_bytes).

    the device's memory (total)
    ┌────────────────────────────────────────────────────┐
    │ in use once the weights are loaded: the CUDA       │ ┐
    │ context, the weights, what other processes hold    │ │ gpu_memory_utilization
    │ activation reserve: one step's transient tensors   │ │ x total
    │ KV pool: the rest (<= memory_limit_per_gpu if set) │ ┘
    ├────────────────────────────────────────────────────┤
    │ headroom: allocator slack, cuBLAS workspaces,      │  1 - gpu_memory_utilization
    │ a step's padded attention grids                    │
    └────────────────────────────────────────────────────┘

Memory in use is read from the device (`total - free`), not from this process's
allocator, so what other processes hold is counted too and the pool never exceeds
what is free. The reserve counts the layers' dense tensors and the logits, not the
attention's gathered K/V and masks, which grow with a step's longest sequence: those
live in the headroom. The arithmetic (`kv_pool_blocks`, `activation_reserve`) is pure;
only `cuda_memory` asks the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from wicore.config import Config, GiB, SpecMethod
from wicore.errors import ConfigError
from wicore.worker.model_runner import text_config

# Activations of one step, per token computed, in elements of the model's dtype: about 8 of the
# hidden size (residual stream, normed input, q/k/v, attention output, o_proj output) and 3 of
# the MLP's (gate, up and their product live at once).
HIDDEN_COPIES = 8
INTERMEDIATE_COPIES = 3
# Per sampled row: its logits in the model's dtype, then in fp32 twice (the `.float()` copy the
# sampler reads, and one softmax or log-softmax of it).
FP32_LOGIT_COPIES = 2


@dataclass(frozen=True, slots=True)
class DeviceMemory:
    total: int  # bytes
    used: int  # bytes in use on the device, by any process


def activation_reserve(
    tokens: int, rows: int, hidden: int, intermediate: int, vocab: int, itemsize: int
) -> int:
    """Bytes for one engine step's transient tensors: `tokens` tokens through the layers
    (max_num_batched_tokens) and `rows` sampled logits rows (max_batch_size, more with speculation):

        tokens x (8 x hidden + 3 x intermediate) x itemsize + rows x vocab x (itemsize + 2 x 4)
    """
    per_token = (HIDDEN_COPIES * hidden + INTERMEDIATE_COPIES * intermediate) * itemsize
    per_row = vocab * (itemsize + FP32_LOGIT_COPIES * 4)
    return tokens * per_token + min(rows, tokens) * per_row


def kv_pool_bytes(total: int, used: int, utilization: float, cap: int, reserve: int) -> int:
    """What `utilization` of `total` leaves after `used` and the activation `reserve`, at most
    `cap` bytes if `cap` > 0; negative when nothing is left."""
    budget = int(total * utilization) - used - reserve
    return min(budget, cap) if cap > 0 else budget


def kv_pool_blocks(
    total: int, used: int, utilization: float, cap: int, reserve: int, bytes_per_block: int
) -> int:
    """Whole blocks of `bytes_per_block` in `kv_pool_bytes`; 0 when none fits."""
    return max(kv_pool_bytes(total, used, utilization, cap, reserve), 0) // bytes_per_block


def cuda_memory(device: torch.device) -> DeviceMemory:
    """The device's total memory and what is in use on it, after handing the caching
    allocator's unused blocks back (they would otherwise count as used)."""
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return DeviceMemory(total, total - free)


def model_activation_reserve(config: Config, model: Any) -> int:
    """`activation_reserve` for this model under the worker's batch limits. With speculative
    decoding, a step samples up to num_tokens + 1 rows for each of disable_by_batch_size sequences."""
    cfg = text_config(model)
    hidden = cfg.hidden_size
    intermediate = getattr(cfg, "intermediate_size", None) or 4 * hidden
    itemsize = torch.empty(0, dtype=model.dtype).element_size()
    wc = config.worker
    rows = wc.max_batch_size
    if wc.speculative.method is not SpecMethod.OFF:
        spec = wc.speculative
        rows = max(rows, min(wc.max_batch_size, spec.disable_by_batch_size) * (spec.num_tokens + 1))
    return activation_reserve(wc.max_num_batched_tokens, rows, hidden, intermediate, cfg.vocab_size, itemsize)


def gpu_kv_blocks(config: Config, model: Any, bytes_per_block: int, memory: DeviceMemory) -> int:
    """The KV pool of a GPU worker whose weights are loaded, in blocks; refuses a budget that
    holds no block, naming the settings that decide it."""
    gpu = config.gpu_config
    reserve = model_activation_reserve(config, model)
    cap = int(gpu.memory_limit_per_gpu * GiB)
    blocks = kv_pool_blocks(
        memory.total, memory.used, gpu.gpu_memory_utilization, cap, reserve, bytes_per_block
    )
    if blocks < 1:
        budget = kv_pool_bytes(memory.total, memory.used, gpu.gpu_memory_utilization, cap, reserve)
        raise ConfigError(
            "gpu_config.gpu_memory_utilization, gpu_config.memory_limit_per_gpu: the KV pool holds no "
            f"block of {bytes_per_block} bytes: {gpu.gpu_memory_utilization} x {memory.total / GiB:.2f} GiB "
            f"- {memory.used / GiB:.2f} GiB in use (weights, CUDA context) - {reserve / GiB:.2f} GiB "
            f"for one step's activations = {budget / GiB:.2f} GiB"
            + (f", capped at {gpu.memory_limit_per_gpu} GiB" if cap > 0 else "")
        )
    return blocks
