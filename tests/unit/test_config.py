from __future__ import annotations

import re
from pathlib import Path

import pytest

from wicore.config import (
    A2crConfig,
    ApiKey,
    ApiKeys,
    Config,
    CpuKernels,
    CudaOptimization,
    LogLevel,
    MixedPrecision,
    RoutingPolicy,
    TenantLimits,
    TierPolicy,
    WorkerDtype,
    build,
    load_config,
    to_dict,
)
from wicore.errors import ConfigError

D1, D2 = "0123456789abcdef" * 4, "fedcba9876543210" * 4


def test_defaults_keep_the_seed_section_names() -> None:
    c = load_config()
    assert c == Config()
    assert c.a2cr_config.attention_weight == 0.0 and c.a2cr_config.time_decay_factor == 0.05
    assert (c.a2cr_config.frequency_weight, c.a2cr_config.frequency_horizon) == (1.0, 300.0)
    assert c.gpu_config.cuda_optimization.mixed_precision == "bf16"  # as vLLM and TGI on GPUs
    assert c.gpu_config.gpu_memory_utilization == 0.9 and c.gpu_config.memory_limit_per_gpu == 0.0
    assert c.gateway.port == 50051


def test_file_then_env_then_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"gateway:\n  port: 1000\n  api_keys: [{{sha256: {D1}, tenant: t}}]\nworker:\n  max_batch_size: 4\n"
    )
    env = {"WICORE_GATEWAY__PORT": "2000", "WICORE_WORKER__DEVICE": "gpu:1", "WICORE_TEST_THING": "x"}
    c = load_config(cfg, env, {"gateway.port": 3000})
    assert c.gateway.port == 3000 and c.gateway.api_keys == (ApiKey(D1, "t"),)
    assert c.worker.device == "gpu:1" and c.worker.max_batch_size == 4
    assert load_config(cfg, env).gateway.port == 2000


def test_round_trip_through_plain_data(tmp_path: Path) -> None:
    import yaml

    c = load_config(None, {}, {
        "gateway.api_keys": [{"sha256": D1, "tenant": "a"}, {"sha256": D2.upper(), "tenant": "b"}],
        "gateway.tenants": {"a": {"max_tokens": 5}, "b": {}},
        "internal.token_file": "/run/token",
        "tier.cpu_capacity_bytes": 123,
    })  # fmt: skip
    assert c.gateway.api_keys[1].sha256 == D2  # digests are kept in lower case
    assert c.gateway.tenants == {"a": TenantLimits(max_tokens=5), "b": TenantLimits()}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(to_dict(c)))
    assert load_config(path) == c


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"gateway.prot": 1}, "gateway.prot: unknown setting"),
        ({"gateway.port": "abc"}, "gateway.port: expected an integer"),
        ({"worker.max_batch_size": True}, "worker.max_batch_size: expected an integer"),
        ({"a2cr_config.attention_weight": "x"}, "a2cr_config.attention_weight: expected a number"),
        ({"nosuch.key": 1}, "nosuch: unknown setting"),
        # Every choice is an enum, checked here once, the error listing what is allowed:
        (
            {"scheduler.routing_policy": "fastest"},
            "scheduler.routing_policy: expected one of 'mor', 'round_robin', 'least_loaded', got 'fastest'",
        ),
        ({"tier.policy": "arc"}, "tier.policy: expected one of 'a2cr', 'lru', 'lfu', got 'arc'"),
        ({"tier.cpu_codec": "q2"}, "tier.cpu_codec: expected one of 'raw', 'fp16', 'bf16', 'q8', 'q4'"),
        (
            {"worker.dtype": "float64"},
            "worker.dtype: expected one of 'auto', 'float32', 'float16', 'bfloat16', got 'float64'",
        ),
        (
            {"worker.cpu_kernels": "mkl"},
            "worker.cpu_kernels: expected one of 'auto', 'onednn', 'default', got 'mkl'",
        ),
        (
            {"gpu_config.cuda_optimization.mixed_precision": "fp8"},
            "gpu_config.cuda_optimization.mixed_precision: expected one of 'fp32', 'fp16', 'bf16', got 'fp8'",
        ),
        (
            {"log_level": "verbose"},
            "log_level: expected one of 'DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL'",
        ),
        ({"worker.device": "cuda:0"}, "worker.device: expected 'cpu', 'gpu:N', or (for wicore up) a comma"),
        ({"worker.device": "gpu:x"}, "worker.device: expected 'cpu', 'gpu:N'"),
        ({"worker.device": ","}, "worker.device: expected 'cpu', 'gpu:N'"),
        ({"worker.device": "auto,cpu"}, "worker.device: expected 'cpu', 'gpu:N'"),
        (
            {"gpu_config.target_devices": ["gpu:0", "tpu"]},
            "gpu_config.target_devices: expected 'cpu', 'gpu:N'",
        ),
        (
            {"gpu_config.enable_tensor_cores": True},
            "gpu_config.enable_tensor_cores: moved to gpu_config.cuda_optimization.enable_tensor_cores",
        ),
    ],
)
def test_bad_settings_are_named(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, {}, overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"gateway.api_keys": ["wc-plain"]},
            r"gateway.api_keys\[0\]: expected a mapping \(sha256, tenant\), got str",
        ),
        ({"gateway.api_keys": "wc-plain"}, r"gateway.api_keys\[0\]: expected a mapping"),
        (
            {"gateway.api_keys": [{"sha256": D1, "tenant": "a"}, {"sha256": "wc-plain", "tenant": "b"}]},
            r"gateway.api_keys\[1\].sha256: not a 64-hex SHA-256 digest \(tenant 'b'\)",
        ),
        ({"gateway.api_keys": [{"sha256": "g" * 64, "tenant": "a"}]}, r"api_keys\[0\].sha256: not a 64-hex"),
        ({"gateway.api_keys": [{"sha256": D1}]}, r"gateway.api_keys\[0\].tenant: must name the key's tenant"),
        ({"gateway.api_keys": [{"sha256": D1, "tenant": "a", "key": "x"}]}, r"api_keys\[0\].key: unknown"),
        ({"gateway.tenants": ["a"]}, "gateway.tenants: expected a mapping, got list"),
        ({"gateway.tenants": {"a": 3}}, "gateway.tenants.a: expected a mapping"),
        ({"gateway.tenants": {"a": {"max_tokens": -1}}}, "gateway.tenants.a.max_tokens: must be >= 0"),
        (
            {"gateway.tenants": {"a": {"max_tokens": "x"}}},
            "gateway.tenants.a.max_tokens: expected an integer",
        ),
        ({"gateway.tenants": {"a": {"rate": 1}}}, "gateway.tenants.a.rate: unknown setting"),
    ],
)
def test_keys_and_tenants_errors_name_the_entry(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, {}, overrides)
    assert "wc-plain" not in str(err.value)  # a key put where a digest belongs is never echoed


def test_tenants_from_the_environment() -> None:
    c = load_config(None, {"WICORE_GATEWAY__TENANTS": "{a: {max_concurrent_requests: 2}}"})
    assert c.gateway.tenants["a"].max_concurrent_requests == 2


def test_build_reads_a_keys_file_shape() -> None:
    keys = build(ApiKeys, {"api_keys": [{"sha256": D1, "tenant": "a"}], "tenants": {"a": {}}}, "keys.yaml")
    assert keys == ApiKeys((ApiKey(D1, "a"),), {"a": TenantLimits()})
    with pytest.raises(ConfigError, match=r"keys.yaml.api_keys\[0\].tenant: must name"):
        build(ApiKeys, {"api_keys": [{"sha256": D1}]}, "keys.yaml")


def test_enums_and_devices_that_load() -> None:
    c = load_config(None, {"WICORE_LOG_LEVEL": "debug"}, {
        "scheduler.routing_policy": "least_loaded",
        "tier.policy": "lfu",
        "worker.dtype": "bfloat16",
        "worker.cpu_kernels": "default",
        "worker.device": " cpu, gpu:1 ,",
    })  # fmt: skip
    assert c.log_level is LogLevel.DEBUG  # any case, as the logging module takes it
    assert load_config(None, {"WICORE_LOG_LEVEL": "warn"}).log_level is LogLevel.WARNING  # its alias
    assert c.scheduler.routing_policy is RoutingPolicy.LEAST_LOADED and c.tier.policy is TierPolicy.LFU
    assert c.worker.dtype is WorkerDtype.BFLOAT16 and c.worker.cpu_kernels is CpuKernels.DEFAULT
    assert to_dict(c)["log_level"] == "DEBUG" and to_dict(c)["tier"]["policy"] == "lfu"
    for device in ("cpu", "gpu:0", "gpu:12", "auto", "gpu:0,gpu:1,cpu"):
        assert load_config(None, {}, {"worker.device": device}).worker.device == device
    assert load_config(None, {}, {"gpu_config.target_devices": "gpu:0,cpu"}).gpu_config.target_devices == (
        "gpu:0",
        "cpu",
    )


# The performance guide's own blocks, exactly as it prints them.
GUIDE = {
    "gpu_config": {
        "target_devices": ["gpu:0", "gpu:1"],
        "memory_limit_per_gpu": 15.0,
        "enable_p2p": True,
        "cuda_optimization": {"enable_cudnn": True, "enable_tensor_cores": True, "mixed_precision": "fp16"},
    },
    "gpu_pool_config": {
        "initial_size": 12 * 1024**3,
        "max_size": 15 * 1024**3,
        "block_size": 4096,
        "enable_defragmentation": True,
    },
    "a2cr_config": {
        "time_decay_factor": 0.05,
        "attention_weight": 0.4,
        "frequency_weight": 0.3,
        "recency_weight": 0.3,
        "eviction_threshold": 0.2,
        "cleanup_interval": 60,
    },
}


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_the_performance_guides_blocks_load(tmp_path: Path, suffix: str) -> None:
    import json

    import yaml

    path = tmp_path / f"guide{suffix}"
    path.write_text(json.dumps(GUIDE) if suffix == ".json" else yaml.safe_dump(GUIDE))
    c = load_config(path)
    gpu = c.gpu_config
    assert gpu.target_devices == ("gpu:0", "gpu:1") and gpu.memory_limit_per_gpu == 15.0 and gpu.enable_p2p
    assert gpu.cuda_optimization == CudaOptimization(True, True, MixedPrecision.FP16)
    assert c.gpu_pool_config.max_size == 15 * 1024**3 and c.gpu_pool_config.enable_defragmentation
    # the guide's values are the defaults but its weights (the defaults rank by decayed frequency)
    guide_weights = {"attention_weight": 0.4, "frequency_weight": 0.3, "recency_weight": 0.3}
    assert c.a2cr_config == A2crConfig(cleanup_interval=60.0, **guide_weights)
    assert c.worker == Config().worker and c.tier == Config().tier
