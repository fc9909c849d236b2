"""Fixtures shared by every test: a tiny model directory, a real Redis; tests marked `cuda`
skipped, with the reason, where torch sees no CUDA device."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from wicore.redis_server import redis_answers, start_private_redis

from tiny_models import save_tiny

DEFAULT_TEST_REDIS = "redis://127.0.0.1:6379/0"

# Services a test starts by hand serve no /metrics (several would want the default port);
# `launch` (tests/stack.py) gives each stack free metrics ports on its command line, which wins.
os.environ["WICORE_OBSERVABILITY__METRICS_PORT"] = "0"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    needs_cuda = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not needs_cuda:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in needs_cuda:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("models") / "tiny-llama", max_context=4096)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """WICORE_TEST_REDIS_URL, else the local default, else a private redis-server."""
    url = os.environ.get("WICORE_TEST_REDIS_URL", DEFAULT_TEST_REDIS)
    if redis_answers(url):
        yield url
        return
    proc, private_url = start_private_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield private_url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
