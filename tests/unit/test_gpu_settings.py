"""The performance guide's gpu_config / gpu_pool_config on a worker: what is honoured (dtype,
cuDNN, TF32) and what is accepted with one warning saying why it does nothing here."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch

from wicore.config import Config, WorkerDtype, load_config
from wicore.errors import ConfigError
from wicore.worker.app import apply_gpu_config, model_dtype, torch_device

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)
GUIDE = {
    "gpu_config.target_devices": ["gpu:0", "gpu:1"],
    "gpu_config.memory_limit_per_gpu": 15.0,
    "gpu_config.enable_p2p": True,
    "gpu_config.cuda_optimization": {
        "enable_cudnn": True,
        "enable_tensor_cores": True,
        "mixed_precision": "fp16",
    },
    "gpu_pool_config": {
        "initial_size": 12 * 1024**3,
        "max_size": 15 * 1024**3,
        "block_size": 4096,
        "enable_defragmentation": True,
    },
}


@pytest.fixture
def cuda_flags() -> Iterator[None]:
    """apply_gpu_config sets process-wide torch switches: put them back."""
    saved = (
        torch.backends.cudnn.enabled,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    yield
    torch.backends.cudnn.enabled, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = (
        saved
    )


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("device", [CPU, GPU])
def test_the_default_config_is_silent_and_changes_nothing(
    caplog: pytest.LogCaptureFixture, cuda_flags: None, device: torch.device
) -> None:
    before = (
        torch.backends.cudnn.enabled,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    with caplog.at_level(logging.WARNING):
        apply_gpu_config(Config(), device)
    assert warnings(caplog) == []
    after = (
        torch.backends.cudnn.enabled,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    assert after == before
    # auto: bfloat16 on a GPU (as vLLM and TGI), float32 on CPU (bf16 changes greedy output there).
    expected = WorkerDtype.BFLOAT16 if device.type == "cuda" else WorkerDtype.FLOAT32
    assert model_dtype(Config(), device) is expected


def test_the_guides_blocks_warn_once_for_each_setting_without_effect(
    caplog: pytest.LogCaptureFixture, cuda_flags: None
) -> None:
    config = load_config(None, {}, GUIDE)
    with caplog.at_level(logging.WARNING):
        apply_gpu_config(config, GPU)
    p2p, pool = warnings(caplog)
    assert p2p.startswith("gpu_config.enable_p2p: has no effect here") and "tier service" in p2p
    # block_size 4096 is the default: only the three changed keys are named.
    assert pool.startswith("gpu_pool_config (initial_size, max_size, enable_defragmentation): has no effect")
    assert "preallocates its KV pool once" in pool
    # Honoured on a CUDA worker: cuDNN stays on, TF32 tensor cores on, fp16 weights and KV.
    assert (
        torch.backends.cudnn.enabled
        and torch.backends.cuda.matmul.allow_tf32
        and torch.backends.cudnn.allow_tf32
    )
    assert model_dtype(config, GPU) is WorkerDtype.FLOAT16
    assert model_dtype(config, CPU) is WorkerDtype.FLOAT32  # a CPU worker keeps float32


def test_cudnn_can_be_turned_off(cuda_flags: None) -> None:
    apply_gpu_config(load_config(None, {}, {"gpu_config.cuda_optimization.enable_cudnn": False}), GPU)
    assert not torch.backends.cudnn.enabled


def test_an_explicit_dtype_wins_over_mixed_precision_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    config = load_config(
        None, {}, {"gpu_config.cuda_optimization.mixed_precision": "fp16", "worker.dtype": "float32"}
    )
    assert model_dtype(config, GPU) is WorkerDtype.FLOAT32
    with caplog.at_level(logging.WARNING):
        apply_gpu_config(config, GPU)
    (message,) = warnings(caplog)
    assert message == (
        "gpu_config.cuda_optimization.mixed_precision: fp16 has no effect: worker.dtype is set (float32); "
        "worker.dtype: auto uses it"
    )
    auto = load_config(None, {}, {"gpu_config.cuda_optimization.mixed_precision": "fp16"})
    assert model_dtype(auto, GPU) is WorkerDtype.FLOAT16
    fp32 = load_config(None, {}, {"gpu_config.cuda_optimization.mixed_precision": "fp32"})
    assert model_dtype(fp32, GPU) is WorkerDtype.FLOAT32


def test_an_explicit_dtype_beside_the_default_precision_is_silent(
    caplog: pytest.LogCaptureFixture, cuda_flags: None
) -> None:
    config = load_config(None, {}, {"worker.dtype": "float16"})
    with caplog.at_level(logging.WARNING):
        apply_gpu_config(config, GPU)
    assert warnings(caplog) == [] and model_dtype(config, GPU) is WorkerDtype.FLOAT16


def test_a_worker_runs_on_one_device() -> None:
    assert torch_device("gpu:1") == torch.device("cuda", 1) and torch_device("cpu") == CPU
    for spec in ("auto", "cpu,gpu:0"):  # valid config for `wicore up`, not for one worker
        with pytest.raises(ConfigError, match=r"worker\.device: a worker runs on one device"):
            torch_device(spec)
