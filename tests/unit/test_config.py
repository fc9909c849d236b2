from __future__ import annotations

from pathlib import Path

import pytest

from wicore.config import Config, load_config, to_dict
from wicore.errors import ConfigError


def test_defaults_keep_the_seed_section_names() -> None:
    c = load_config()
    assert c == Config()
    assert c.a2cr_config.attention_weight == 0.4 and c.a2cr_config.time_decay_factor == 0.05
    assert c.gpu_config.cuda_optimization.mixed_precision == "fp32"
    assert c.gateway.port == 50051


def test_file_then_env_then_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("gateway:\n  port: 1000\n  api_keys: [k1]\nworker:\n  max_batch_size: 4\n")
    env = {"WICORE_GATEWAY__PORT": "2000", "WICORE_WORKER__DEVICE": "gpu:1", "WICORE_TEST_THING": "x"}
    c = load_config(cfg, env, {"gateway.port": 3000})
    assert c.gateway.port == 3000 and c.gateway.api_keys == ("k1",)
    assert c.worker.device == "gpu:1" and c.worker.max_batch_size == 4
    assert load_config(cfg, env).gateway.port == 2000


def test_round_trip_through_plain_data(tmp_path: Path) -> None:
    import yaml

    c = load_config(None, {}, {"gateway.api_keys": ["a", "b"], "tier.cpu_capacity_bytes": 123})
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
