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
        reg.pick("")
    reg.register(worker("a", "m"))
    with pytest.raises(ModelNotFound, match="'other' is not served"):
        reg.pick("other")
    assert reg.pick("").worker_id == "a"


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
        reg.pick("m", exclude=frozenset({"a"}))
    clock.now += 6
    assert [w.worker_id for w in reg.expire()] == ["a"]
    with pytest.raises(WorkerUnavailable):
        reg.pick("m")


def test_pick_prefers_fewest_in_flight_then_takes_turns() -> None:
    clock = ManualClock()
    reg = WorkerRegistry(timeout_s=5, clock=clock)
    for wid in ("a", "b", "c"):
        reg.register(worker(wid))
    reg.workers["a"].inflight = 2
    picks = []
    for _ in range(4):
        clock.now += 1
        picks.append(reg.pick("m").worker_id)
    assert picks == ["b", "c", "b", "c"]
    assert reg.pick("m", exclude=frozenset({"b", "c"})).worker_id == "a"


def test_default_model_is_the_first_registered() -> None:
    clock = ManualClock()
    reg = WorkerRegistry(timeout_s=5, clock=clock)
    reg.register(worker("a", "first"))
    clock.now += 1
    reg.register(worker("b", "second"))
    assert reg.default_model() == "first"
    assert reg.pick("").model == "first"
    assert reg.pick("second").worker_id == "b"
