"""API keys by digest, mapped to tenants: the KeyRing, the keys file's reloads, `wicore keygen`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from wicore.cli import keygen
from wicore.config import ApiKey, ApiKeys, TenantLimits, load_config
from wicore.errors import ConfigError, Unauthenticated
from wicore.gateway.auth import ANONYMOUS, KeyRing, Tenant, fold_cache_salt, key_digest, new_key

from clocks import ManualClock

ALICE, BOB = new_key(), new_key()


def write_atomically(path: Path, data: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(data))
    os.replace(tmp, path)


def entry(key: str, tenant: str) -> dict[str, str]:
    return {"sha256": key_digest(key), "tenant": tenant}


def test_new_keys_are_random_and_known_by_their_digest() -> None:
    assert ALICE != BOB and ALICE.startswith("wc-") and len(ALICE) == 3 + 43
    digest = key_digest(ALICE)
    assert len(digest) == 64 and digest != key_digest(BOB) and ALICE not in digest


def test_no_keys_means_anonymous() -> None:
    ring = KeyRing()
    assert not ring.enabled
    assert ring.authenticate(None) is ANONYMOUS and ring.authenticate("Bearer anything") is ANONYMOUS


def test_a_key_maps_to_its_tenant_and_limits() -> None:
    keys = ApiKeys(
        (ApiKey(key_digest(ALICE), "alice"), ApiKey(key_digest(BOB).upper(), "bob")),
        {"alice": TenantLimits(max_concurrent_requests=2, max_tokens=64)},
    )
    ring = KeyRing(keys)
    assert ring.enabled
    assert ring.authenticate(f"Bearer {ALICE}") == Tenant("alice", 2, 64)
    assert ring.authenticate(f"bearer   {BOB} ") == Tenant("bob")  # digests match in any case
    assert ring.authenticate(BOB) == Tenant("bob")  # the bare key, as HTTP clients sometimes send it


@pytest.mark.parametrize(
    "authorization", [None, "", "Bearer ", f"Bearer {ALICE}x", "Bearer wc-wrong", "Basic xyz"]
)
def test_missing_and_wrong_keys_are_refused(authorization: str | None) -> None:
    ring = KeyRing(ApiKeys((ApiKey(key_digest(ALICE), "alice"),)))
    with pytest.raises(Unauthenticated, match="missing or unknown API key"):
        ring.authenticate(authorization)


def test_a_digest_given_twice_is_named() -> None:
    keys = ApiKeys((ApiKey(key_digest(ALICE), "alice"), ApiKey(key_digest(ALICE), "bob")))
    with pytest.raises(ConfigError, match=r"gateway.api_keys\[1\]: the same key as gateway.api_keys\[0\]"):
        KeyRing(keys)


def test_keys_file_revocation_and_new_keys_without_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    write_atomically(path, {"api_keys": [entry(ALICE, "alice"), entry(BOB, "bob")]})
    clock = ManualClock()
    ring = KeyRing(keys_file=str(path), clock=clock)
    assert ring.authenticate(f"Bearer {BOB}").name == "bob"

    write_atomically(path, {"api_keys": [entry(ALICE, "alice")], "tenants": {"alice": {"max_tokens": 8}}})
    clock.now += 0.5
    assert ring.authenticate(f"Bearer {BOB}").name == "bob"  # looked at no more than once a second
    clock.now += 0.6
    with pytest.raises(Unauthenticated):
        ring.authenticate(f"Bearer {BOB}")  # revoked
    assert ring.authenticate(f"Bearer {ALICE}") == Tenant("alice", max_tokens=8)

    path.write_text(yaml.safe_dump({"api_keys": [entry(ALICE, "alice"), entry(BOB, "robert")]}))  # in place
    clock.now += 1.0
    assert ring.authenticate(f"Bearer {BOB}").name == "robert"


def test_a_broken_keys_file_keeps_the_last_good_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.yaml"
    write_atomically(path, {"api_keys": [entry(ALICE, "alice")]})
    clock = ManualClock()
    ring = KeyRing(keys_file=str(path), clock=clock)
    for broken in ("api_keys: [{sha256: wc-secret1, tenant: x}]\n", "api_keys: [wc-secret2\n", "[]"):
        path.write_text(broken)
        clock.now += 1.0
        assert ring.authenticate(f"Bearer {ALICE}").name == "alice"
    path.unlink()
    clock.now += 1.0
    assert ring.authenticate(f"Bearer {ALICE}").name == "alice"
    assert caplog.text.count("the keys read before stay in force") == 4
    assert "wc-secret" not in caplog.text  # what was found is never echoed: it may be a key


def test_an_empty_keys_file_refuses_everyone(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("")
    ring = KeyRing(keys_file=str(path))
    assert ring.enabled
    with pytest.raises(Unauthenticated):
        ring.authenticate(f"Bearer {ALICE}")


def test_a_bad_keys_file_at_start_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"gateway\.api_keys_file: cannot read"):
        KeyRing(keys_file=str(tmp_path / "missing.yaml"))
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"api_keys": [{"sha256": ALICE, "tenant": "alice"}]}))
    with pytest.raises(ConfigError, match=r"keys.yaml.api_keys\[0\].sha256: not a 64-hex SHA-256") as err:
        KeyRing(keys_file=str(path))
    assert ALICE not in str(err.value)


def test_config_and_file_keys_merge_and_the_file_wins_a_tenants_limits(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    write_atomically(path, {"api_keys": [entry(BOB, "bob")], "tenants": {"alice": {"max_tokens": 4}}})
    config = load_config(None, {}, {
        "gateway.api_keys": [entry(ALICE, "alice")],
        "gateway.tenants": {"alice": {"max_tokens": 100, "max_concurrent_requests": 3}},
        "gateway.api_keys_file": str(path),
    })  # fmt: skip
    ring = KeyRing.from_config(config.gateway)
    assert ring.authenticate(f"Bearer {ALICE}") == Tenant("alice", max_tokens=4)
    assert ring.authenticate(f"Bearer {BOB}") == Tenant("bob")


def test_keygen_prints_a_key_and_the_line_that_lets_it_in(tmp_path: Path) -> None:
    out = keygen("team a")
    key = out.split("key:", 1)[1].split()[0]
    line = next(x for x in out.splitlines() if x.strip().startswith("- {sha256"))
    assert key not in line
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"gateway:\n  api_keys:\n{line}\n")
    ring = KeyRing.from_config(load_config(cfg).gateway)
    assert ring.authenticate(f"Bearer {key}").name == "team a"


def test_tenants_never_share_a_salt() -> None:
    assert fold_cache_salt(ANONYMOUS, "s") == "s"
    salts = {
        fold_cache_salt(Tenant("a"), "b:c"),
        fold_cache_salt(Tenant("a:b"), "c"),
        fold_cache_salt(Tenant("a"), ""),
        fold_cache_salt(Tenant("b"), ""),
    }
    assert len(salts) == 4
