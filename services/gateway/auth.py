"""Who is calling: API keys to tenants. One check serves gRPC and HTTP.

Keys are known by their SHA-256 digests only (`wicore keygen` prints a new key and
its digest), each mapped to a tenant; `gateway.tenants` gives a tenant its own
limits. Two sources, merged: `gateway.api_keys` / `gateway.tenants` in the config,
and `gateway.api_keys_file`, a YAML file of the same shape that is re-read when it
changes (its mtime is looked at, on authentication, at most once a second), so a
key is revoked by deleting its line, without a restart. A file that cannot be read
or parsed leaves the keys of its last good version in force (and says so in the
log): write it to a temporary name and rename it over the old one.

Authentication is on as soon as a key or a keys file is configured; a keys file
with no keys refuses everyone.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from wicore.api_keys import key_digest as key_digest  # re-exported: keys are the gateway's
from wicore.api_keys import new_key as new_key
from wicore.config import ApiKeys, GatewayConfig, TenantLimits, build
from wicore.errors import ConfigError, Unauthenticated

log = logging.getLogger(__name__)

RECHECK_S = 1.0  # the keys file's mtime is looked at no more often than this


@dataclass(frozen=True, slots=True)
class Tenant:
    """A caller's tenant; its name is folded into the cache salt (see `fold_cache_salt`)."""

    name: str  # "" = anonymous (no keys configured)
    max_concurrent_requests: int = 0  # 0: only the gateway's own limit
    max_tokens: int = 0  # per request; 0: no limit beyond the model's


ANONYMOUS = Tenant("")


def fold_cache_salt(tenant: Tenant, client_salt: str) -> str:
    """The cache salt past the gateway: the tenant's name first, unambiguously, so two
    tenants never share a KV block whatever salts they send; the client's salt only
    partitions further inside its tenant. Without keys, the client's salt as is."""
    if not tenant.name:
        return client_salt
    return f"tenant:{len(tenant.name)}:{tenant.name}:{client_salt}"


def bearer_token(authorization: str | None) -> str:
    value = authorization or ""
    return value[7:].strip() if value[:7].lower() == "bearer " else value.strip()


@dataclass(frozen=True, slots=True)
class _Entry:
    digest: bytes
    tenant: Tenant


def _index(sources: list[tuple[str, ApiKeys]]) -> tuple[_Entry, ...]:
    """Every key's digest and tenant; a tenant's limits from the last source naming it.
    `sources` are (where, keys) pairs; a key given twice is a ConfigError naming both places."""
    limits: dict[str, TenantLimits] = {}
    for _, keys in sources:
        limits.update(keys.tenants)
    seen: dict[str, str] = {}
    entries = []
    for where, keys in sources:
        for i, key in enumerate(keys.api_keys):
            here = f"{where}api_keys[{i}]"
            if key.sha256 in seen:
                raise ConfigError(f"{here}: the same key as {seen[key.sha256]}")
            seen[key.sha256] = here
            own = limits.get(key.tenant, TenantLimits())
            tenant = Tenant(key.tenant, own.max_concurrent_requests, own.max_tokens)
            entries.append(_Entry(bytes.fromhex(key.sha256), tenant))
    return tuple(entries)


def read_keys_file(path: Path) -> ApiKeys:
    """The `api_keys` and `tenants` of a keys file (ConfigError names the file and the entry)."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"gateway.api_keys_file: cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:  # its position only: YAML's own message quotes the line
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"gateway.api_keys_file: {path} is not valid YAML{at}") from None
    return build(ApiKeys, data if data is not None else {}, str(path))


class _KeysFile:
    """The keys file, re-read when its mtime, size or inode changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stamp = self._stamp()
        self.keys = read_keys_file(path)  # at start, a bad file is a ConfigError

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def changed(self) -> bool:
        """Re-reads the file if it changed; True if it now holds other keys."""
        stamp = self._stamp()
        if stamp == self.stamp:
            return False
        self.stamp = stamp
        try:
            keys = read_keys_file(self.path)
        except ConfigError as exc:
            log.error("%s; the keys read before stay in force", exc)
            return False
        log.info("API keys reloaded from %s: %d keys", self.path, len(keys.api_keys))
        self.keys = keys
        return True


class KeyRing:
    """API key -> tenant, from the config's keys and the keys file (see the module docstring)."""

    def __init__(
        self,
        keys: ApiKeys | None = None,
        keys_file: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = keys or ApiKeys()
        self._file = _KeysFile(Path(keys_file).expanduser()) if keys_file else None
        self._clock = clock
        self._checked_at = clock()
        self._entries = self._build()

    @classmethod
    def from_config(cls, config: GatewayConfig) -> KeyRing:
        return cls(ApiKeys(config.api_keys, config.tenants), config.api_keys_file)

    @property
    def enabled(self) -> bool:
        return bool(self._config.api_keys) or self._file is not None

    def _build(self) -> tuple[_Entry, ...]:
        sources = [("gateway.", self._config)]
        if self._file is not None:
            sources.append((f"{self._file.path}: ", self._file.keys))
        return _index(sources)

    def _refresh(self) -> None:
        if self._file is None or self._clock() - self._checked_at < RECHECK_S:
            return
        self._checked_at = self._clock()
        if self._file.changed():
            try:
                self._entries = self._build()
            except ConfigError as exc:  # e.g. a key given both in the config and the file
                log.error("%s; the keys read before stay in force", exc)

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant of the `authorization` value (`Bearer KEY`); raises Unauthenticated."""
        if not self.enabled:
            return ANONYMOUS
        self._refresh()
        token = bearer_token(authorization)
        if token:
            digest = hashlib.sha256(token.encode()).digest()
            for entry in self._entries:
                if hmac.compare_digest(digest, entry.digest):
                    return entry.tenant
        raise Unauthenticated("authorization: missing or unknown API key (send 'authorization: Bearer KEY')")
