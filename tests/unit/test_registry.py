from __future__ import annotations

import pytest

from wicore.errors import ModelNotFound, WorkerUnavailable
from wicore.scheduler.registry import WorkerInfo, WorkerLoad, WorkerRegistry

from clocks import ManualClock


def worker(worker_id: str, model: str = "m") -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id, address=f"{worker_id}:1", device="cpu", model=model, max_context=512
    )


def test_no_worker_is_unavailable_and_unknown_model_is_not_found() -> None:
    reg = WorkerRegistry(timeout_s=5, clock=ManualClock())
    with pytest.raises(WorkerUnavailable, match="no worker is registered"):
        reg.resolve("")
    reg.register(worker("a", "m"))
    with pytest.raises(ModelNotFound, match="'other' is not served"):
        reg.resolve("other")
    assert [w.worker_id for w in reg.resolve("")] == ["a"]


def test_silent_workers_are_dropped_and_heartbeats_keep_them() -> None:
    clock = ManualClock()
    reg = WorkerRegistry(timeout_s=5, clock=clock)
    reg.register(worker("a"))
    reg.register(worker("b"))
    clock.now += 4
    assert reg.heartbeat("a", WorkerLoad(running=1))
    clock.now += 2
    assert [w.worker_id for w in reg.expire()] == ["b"]
    assert list(reg.workers) == ["a"]
    assert not reg.heartbeat("b", WorkerLoad())  # forgotten: must register again
    with pytest.raises(WorkerUnavailable):
        reg.resolve("m", exclude=frozenset({"a"}))
    clock.now += 6
    assert [w.worker_id for w in reg.expire()] == ["a"]
    with pytest.raises(WorkerUnavailable):
        reg.resolve("m")


def test_default_model_is_the_first_registered() -> None:
    clock = ManualClock()
    reg = WorkerRegistry(timeout_s=5, clock=clock)
    reg.register(worker("a", "first"))
    clock.now += 1
    reg.register(worker("b", "second"))
    assert reg.default_model() == "first"
    assert [w.model for w in reg.resolve("")] == ["first"]
    assert [w.worker_id for w in reg.resolve("second")] == ["b"]
