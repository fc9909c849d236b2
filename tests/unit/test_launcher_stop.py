"""How `wicore up` stops its children: in the reverse of their start order, one kind at a time
(the gateway drains while the workers behind it still serve; the workers deregister while the
scheduler still answers), each stage given STOP_TIMEOUT_S before SIGKILL. Real processes that
note when SIGTERM reaches them and when they exit."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from wicore import launcher
from wicore.launcher import Child, spawn

CHILD = """
import signal, sys, time
name, log, ignore = sys.argv[1], sys.argv[2], sys.argv[3] == "ignore"
def note(event):
    with open(log, "a") as f:
        f.write(f"{name} {event}\\n")
def stop(*_):
    note("term")
    if ignore:
        return
    time.sleep(0.3)  # a drain: the next stage must wait for it
    note("exit")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
while True:
    time.sleep(1)
"""


def started(names: list[str], log: Path, ignoring: str = "") -> list[Child]:
    children = []
    for name in names:
        mode = "ignore" if name == ignoring else "stop"
        proc, output = spawn([sys.executable, "-c", CHILD, name, str(log), mode])
        children.append(Child(name, proc, None, output=output))
    deadline = time.monotonic() + 60
    for child in children:  # each has its SIGTERM handler before it is stopped
        assert child.output is not None
        while "ready" not in child.output.lines:
            assert time.monotonic() < deadline, f"{child.name} never started"
            time.sleep(0.05)
    return children


def test_children_stop_in_reverse_order_a_kind_at_a_time(tmp_path: Path) -> None:
    log = tmp_path / "events"
    names = ["redis", "tier", "scheduler", "worker-0", "worker-1", "gateway"]
    children = started(names, log)
    launcher._stop(children)
    events = log.read_text().split("\n")[:-1]
    stages = [["gateway"], ["worker-0", "worker-1"], ["scheduler"], ["tier"], ["redis"]]
    at = 0
    for stage in stages:
        terms = sorted(events[at : at + len(stage)])
        exits = sorted(events[at + len(stage) : at + 2 * len(stage)])
        assert terms == [f"{name} term" for name in stage], events  # all of a stage at once
        assert exits == [f"{name} exit" for name in stage], events  # before the next stage
        at += 2 * len(stage)
    assert at == len(events)
    assert all(child.proc.returncode == 0 for child in children)


def test_a_child_that_ignores_sigterm_is_killed_and_the_rest_still_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launcher, "STOP_TIMEOUT_S", 0.5)
    log = tmp_path / "events"
    children = started(["redis", "tier", "gateway"], log, ignoring="tier")
    launcher._stop(children)
    events = log.read_text().split("\n")[:-1]
    assert events == ["gateway term", "gateway exit", "tier term", "redis term", "redis exit"]
    assert children[1].proc.returncode == -9  # SIGKILL, after its stage's time
