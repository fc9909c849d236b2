"""Injected clocks for tests: nothing sleeps."""

from __future__ import annotations


class ManualClock:
    """Returns `now`; tests move it by hand."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class TickingClock(ManualClock):
    """Advances one second at every reading, so each event gets a distinct time."""

    def __init__(self, now: float = 1000.0) -> None:
        super().__init__(now)

    def __call__(self) -> float:
        self.now += 1.0
        return self.now
