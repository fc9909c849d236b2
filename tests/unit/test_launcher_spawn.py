"""`wicore up`'s children: each in a process group of its own (a Ctrl-C at the terminal reaches
`up` alone, which stops them in order), but in `up`'s session, so that Linux schedules them with
the processes beside them (a session is one scheduling group) and `nice` ranks them as it should."""

from __future__ import annotations

import os
import sys

from wicore.launcher import spawn

REPORT = "import os; print(os.getpid(), os.getpgid(0), os.getsid(0))"


def test_a_child_gets_its_own_process_group_in_the_launchers_session() -> None:
    proc, output = spawn([sys.executable, "-c", REPORT])
    assert proc.wait(timeout=60) == 0
    pid, group, session = map(int, output.text().split())
    assert pid == proc.pid
    assert group == pid != os.getpgid(0)
    assert session == os.getsid(0)
