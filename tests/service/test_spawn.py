"""`wicore up`'s way of starting children: no gRPC fork hazard, retries that say why,
children that end with the launcher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from wicore import launcher
from wicore.launcher import Child

from stack import alive, free_port

SPAWNS = 500  # 200 with a preexec_fn hung 1 run of 2 here; 2,000 hung 3 of 3

# Runs in its own process so that a deadlock in fork handlers fails the test by timeout
# instead of hanging the suite: a gRPC health server as a spawned child, then SPAWNS
# children started and reaped, with a health poll over gRPC before each.
_LOOP = textwrap.dedent(
    """
    import asyncio, sys
    from wicore.launcher import spawn
    from wicore.server import wait_for_serving

    port, count = sys.argv[1], int(sys.argv[2])
    server_code = (
        "import asyncio\\n"
        "from wicore.child import die_with_parent\\n"
        "from wicore.server import ServiceServer\\n"
        "die_with_parent()\\n"
        "async def main():\\n"
        f"    s = ServiceServer('probe', '127.0.0.1', {port})\\n"
        "    await s.start()\\n"
        "    await s.set_serving(True)\\n"
        "    await s.serve_until_signal()\\n"
        "asyncio.run(main())\\n"
    )
    server, _ = spawn([sys.executable, "-c", server_code])
    assert asyncio.run(wait_for_serving(f"127.0.0.1:{port}", timeout_s=30)), "probe server never served"
    child_code = "from wicore.child import die_with_parent; die_with_parent()"
    failures = []
    for i in range(count):
        assert asyncio.run(wait_for_serving(f"127.0.0.1:{port}", timeout_s=5)), f"health poll {i} failed"
        proc, output = spawn([sys.executable, "-c", child_code])
        if proc.wait(timeout=30) != 0:
            failures.append((i, proc.returncode, output.text()))
    server.terminate()
    server.wait(timeout=15)
    print("failures:", failures)
    print("spawned", count)
    """
)


def test_spawns_between_grpc_health_polls_never_crash_or_hang() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _LOOP, str(free_port()), str(SPAWNS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "failures: []" in done.stdout, done.stdout[-3000:]
    assert f"spawned {SPAWNS}" in done.stdout


def test_a_child_that_never_becomes_ready_is_retried_and_its_output_shown(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(launcher, "START_BACKOFF_S", 0.01)
    child = Child.launch("tier", ["tier", "--set", "no-equals-sign"], f"127.0.0.1:{free_port()}")
    assert launcher._until_ready(child, lambda: False) is False
    err = capfd.readouterr().err
    for attempt in (1, 2, 3):
        assert f"tier did not become ready (attempt {attempt} of 3: exited with 2)" in err
    assert err.count("| wicore: configuration error: --set 'no-equals-sign': expected SECTION.KEY=VALUE") == 3


def test_children_get_sigterm_when_the_launcher_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    code = textwrap.dedent(
        f"""
        import sys, time
        from wicore.launcher import spawn
        child = (
            "import os, signal, sys, time\\n"
            "from wicore.child import die_with_parent\\n"
            "die_with_parent()\\n"
            "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\\n"
            "open({str(pid_file)!r}, 'w').write(str(os.getpid()))\\n"
            "time.sleep(60)\\n"
        )
        spawn([sys.executable, "-c", child])
        time.sleep(60)
        """
    )
    launcher_proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.05)
    child_pid = int(pid_file.read_text())
    os.kill(launcher_proc.pid, signal.SIGKILL)
    launcher_proc.wait()
    deadline = time.monotonic() + 10
    while alive(child_pid):
        assert time.monotonic() < deadline, "the child outlived the launcher"
        time.sleep(0.05)
