"""How a child of `wicore up` ties its life to the launcher's.

The launcher starts children with no `preexec_fn` (see `wicore.launcher.spawn`),
so each child asks here, after exec, to get SIGTERM when the launcher dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

PARENT_PID_ENV = "WICORE_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Called first thing in a child of `wicore.launcher.spawn`: SIGTERM when the launcher dies.

    The child asks for it itself, after exec, because a `preexec_fn` would make
    Python fork() instead of vfork(), and fork() runs gRPC's fork handlers in a
    process that has used gRPC (the launcher polls health over gRPC). With
    grpcio 1.85 those handlers deadlock the parent or crash the child before exec
    (grpc/grpc issue 43055): 2,000 spawns between health polls hung 3 runs of 3
    with a preexec_fn, and finished 2,000 of 2,000 without one (vfork runs no
    fork handlers). If the launcher died before this call, the child exits now.
    """
    parent = os.environ.pop(PARENT_PID_ENV, "")
    if not parent:
        return
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):
        os._exit(1)
