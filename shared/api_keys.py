"""API keys as `wicore keygen` makes them and the gateway knows them (`wicore.gateway.auth`)."""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "wc-"


def new_key() -> str:
    """A fresh API key: `wc-` and 32 random bytes, URL-safe base64."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_digest(key: str) -> str:
    """What a config file holds for `key`: its SHA-256, 64 hex digits."""
    return hashlib.sha256(key.encode()).hexdigest()
