"""A GPU worker's KV pool: what gpu_memory_utilization of the device leaves after the loaded
weights and one step's activations, capped by memory_limit_per_gpu; exact block counts."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig

from wicore.config import GiB, MiB, load_config
from wicore.errors import ConfigError
from wicore.worker.kv_budget import (
    DeviceMemory,
    activation_reserve,
    gpu_kv_blocks,
    kv_pool_blocks,
    model_activation_reserve,
)
from wicore.worker.paged_attention import KVPool

# Llama-3-8B in bf16 with 16-token blocks: 2 (K, V) x 32 layers x 16 tokens x 8 heads x 128 x 2 bytes.
LLAMA_8B_BLOCK = KVPool.bytes_per_block(32, 16, 8, 128, torch.bfloat16)
# Its activation reserve at the worker's defaults (512 tokens a step, 64 sequences):
# 512 x (8 x 4096 + 3 x 14336) x 2 bytes + 64 rows x 128256 x (2 + 2 x 4) bytes.
LLAMA_8B_RESERVE = 77_594_624 + 82_083_840


def llama_8b(dtype: torch.dtype = torch.bfloat16) -> SimpleNamespace:
    """What the budget reads of a loaded model: its config and dtype."""
    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    )
    return SimpleNamespace(config=config, dtype=dtype)


def test_the_llama_8b_block_and_reserve() -> None:
    assert 2 * MiB == LLAMA_8B_BLOCK
    assert activation_reserve(512, 64, 4096, 14336, 128256, 2) == LLAMA_8B_RESERVE
    assert model_activation_reserve(load_config(), llama_8b()) == LLAMA_8B_RESERVE


def test_the_reserve_counts_at_most_one_logits_row_per_token() -> None:
    # 4 tokens a step can sample at most 4 sequences, whatever max_batch_size says.
    assert activation_reserve(4, 64, 8, 16, 100, 4) == 4 * (8 * 8 + 3 * 16) * 4 + 4 * 100 * (4 + 8)


def test_the_pool_takes_what_utilization_leaves_after_the_weights_and_activations() -> None:
    # An 80 GiB card, 16 GiB in use after loading: 0.9 x 80 GiB - 16 GiB - the reserve
    # = 59_969_863_680 bytes = 28_595 blocks of 2 MiB (and 1_802_240 bytes over).
    total, used = 80 * GiB, 16 * GiB
    assert int(total * 0.9) - used - LLAMA_8B_RESERVE == 59_969_863_680
    assert kv_pool_blocks(total, used, 0.9, 0, LLAMA_8B_RESERVE, LLAMA_8B_BLOCK) == 28_595
    # All of the card: 64 GiB - the reserve.
    assert kv_pool_blocks(total, used, 1.0, 0, LLAMA_8B_RESERVE, LLAMA_8B_BLOCK) == 32_691


def test_memory_limit_per_gpu_caps_the_pool() -> None:
    total, used = 80 * GiB, 16 * GiB
    assert kv_pool_blocks(total, used, 0.9, 10 * GiB, LLAMA_8B_RESERVE, LLAMA_8B_BLOCK) == 5_120
    # A cap above what utilization leaves changes nothing.
    assert kv_pool_blocks(total, used, 0.9, 60 * GiB, LLAMA_8B_RESERVE, LLAMA_8B_BLOCK) == 28_595


def test_whole_blocks_only_and_none_when_nothing_is_left() -> None:
    block = 1000
    assert kv_pool_blocks(10_000, 2_000, 0.5, 0, 2_000, block) == 1  # 5_000 - 2_000 - 2_000
    assert kv_pool_blocks(10_000, 2_000, 0.5, 0, 2_001, block) == 0  # one byte short
    assert kv_pool_blocks(10_000, 6_000, 0.5, 0, 0, block) == 0  # the weights exceed the share
    assert kv_pool_blocks(10_000, 0, 0.5, 999, 0, block) == 0  # a cap below one block


def test_the_worker_settings_decide_the_gpu_pool() -> None:
    memory = DeviceMemory(total=80 * GiB, used=16 * GiB)
    assert gpu_kv_blocks(load_config(), llama_8b(), LLAMA_8B_BLOCK, memory) == 28_595
    capped = load_config(None, {}, {"gpu_config.memory_limit_per_gpu": 10})
    assert gpu_kv_blocks(capped, llama_8b(), LLAMA_8B_BLOCK, memory) == 5_120
    # 2048 tokens a step reserve 1536 x 75776 x 2 bytes more (111 blocks and a bit).
    wide = load_config(None, {}, {"worker.max_num_batched_tokens": 2048})
    assert activation_reserve(2048, 64, 4096, 14336, 128256, 2) == LLAMA_8B_RESERVE + 232_783_872
    assert gpu_kv_blocks(wide, llama_8b(), LLAMA_8B_BLOCK, memory) == 28_484


def test_a_budget_without_a_block_is_refused_naming_the_settings() -> None:
    memory = DeviceMemory(total=80 * GiB, used=75 * GiB)  # weights beyond 0.9 of the card
    with pytest.raises(ConfigError) as refused:
        gpu_kv_blocks(load_config(), llama_8b(), LLAMA_8B_BLOCK, memory)
    message = str(refused.value)
    assert message.startswith(
        "gpu_config.gpu_memory_utilization, gpu_config.memory_limit_per_gpu: the KV pool holds no block "
        "of 2097152 bytes: 0.9 x 80.00 GiB - 75.00 GiB in use"
    )


@pytest.mark.parametrize("value", [0.0, -0.1, 1.01, math.nan])
def test_gpu_memory_utilization_is_a_share_of_the_device(value: float) -> None:
    with pytest.raises(ConfigError, match=r"^gpu_config\.gpu_memory_utilization: must be in \(0, 1\]"):
        load_config(None, {}, {"gpu_config.gpu_memory_utilization": value})


def test_the_defaults_size_the_pool_from_utilization_without_a_cap() -> None:
    gpu = load_config(None, {}, {"gpu_config.gpu_memory_utilization": 1}).gpu_config
    assert gpu.gpu_memory_utilization == 1.0
    defaults = load_config().gpu_config
    assert defaults.gpu_memory_utilization == 0.9 and defaults.memory_limit_per_gpu == 0.0
    with pytest.raises(ConfigError, match=r"^gpu_config\.memory_limit_per_gpu: must be >= 0 GiB"):
        load_config(None, {}, {"gpu_config.memory_limit_per_gpu": -1})
