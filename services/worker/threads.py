"""The worker's threads and OpenMP: one thread runs its parallel torch work.

torch runs CPU operations on OpenMP threads, and GNU OpenMP (torch's) gives every thread that
starts a parallel region a team of its own, kept for as long as that thread lives. While a process
holds more OpenMP threads than it has CPUs, libgomp stops spinning at its barriers and sleeps there
at once; the hundreds of parallel regions of a decode step then each end in a futex wake-up.
Measured on two cores (SmolLM2, 16 x 128 -> 64): a batch-16 decode step took 26.5 ms with the model
loaded and run on one thread, 34 ms when it was loaded on one thread and run on another.

So the worker loads and tunes its model, builds its engine and runs the engine loop on one
`EngineThread`, and any other thread that touches tensors (the tier codec's) first confines itself
(`confine_openmp`), so that its operations run on it alone and start no team. It keeps libgomp's
default wait policy (spin a while, then sleep): through the stack, 282 tok/s on a quiet machine and
271 beside a busy loop at nice 19, against 233 and 204 with `OMP_WAIT_POLICY=PASSIVE` (which the
worker set until the stack's services shared `up`'s session: see `wicore.launcher.spawn`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import functools
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")

_Call = tuple[Callable[..., Any], tuple[Any, ...], "concurrent.futures.Future[Any]"]


class EngineThread:
    """A daemon thread that runs what it is given, in order: the worker's model loading and engine
    construction, then the engine loop, which keeps it until the engine stops. (Not a one-thread
    ThreadPoolExecutor: the interpreter waits for those at exit, and an engine loop never returns
    unless stopped.)"""

    def __init__(self, name: str = "engine") -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._calls.put((fn, args, future))
        return future

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on this thread, awaited from an event loop."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    def close(self) -> None:
        """Ends the thread once what it was given has run."""
        self._calls.put(None)

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            fn, args, future = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the caller, as an executor would
                future.set_exception(exc)


def confine_openmp() -> None:
    """The torch operations of the calling thread run on it alone: it starts no OpenMP threads.

    For threads other than the engine's that handle tensors. torch sets each thread's OpenMP
    thread count once, on its first use there; this sets it to one afterwards. (MKL's vector math,
    which torch calls for a few functions such as `exp` on large tensors, keeps its own count.)"""
    torch.get_num_threads()  # torch's own per-thread setting first, so that it does not undo this one
    library = _openmp_library()
    if library is not None:
        library.omp_set_num_threads(1)


def confined_executor(name: str) -> concurrent.futures.ThreadPoolExecutor:
    """A one-thread executor whose thread is confined (`confine_openmp`)."""
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name, initializer=confine_openmp)


@functools.cache
def _openmp_library() -> ctypes.CDLL | None:
    """The OpenMP runtime torch loaded (found in this process's mappings), or None without one."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {fields[5] for fields in map(str.split, maps) if len(fields) >= 6}
    except OSError:
        return None
    for path in sorted(paths):
        name = os.path.basename(path)
        if name.startswith(("libgomp", "libiomp")) and os.path.exists(path):
            return ctypes.CDLL(path)  # already loaded: the same library, not a second runtime
    return None
