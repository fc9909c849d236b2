from __future__ import annotations

from pathlib import Path

import pytest

from wicore.config import ApiKey, ApiKeys, Config, TenantLimits, build, load_config, to_dict
from wicore.errors import ConfigError

D1, D2 = "0123456789abcdef" * 4, "fedcba9876543210" * 4


def test_defaults_keep_the_seed_section_names() -> None:
    c = load_config()
    assert c == Config()
    assert c.a2cr_config.attention_weight == 0.4 and c.a2cr_config.time_decay_factor == 0.05
    assert c.gpu_config.cuda_optimization.mixed_precision == "fp32"
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
    ],
)
def test_bad_settings_are_named(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
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
