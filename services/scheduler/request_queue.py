"""The scheduler's waiting queue: priorities with aging, a size bound, deadlines.

    effective priority = priority + (now - arrival) / aging_interval_s

so a request gains one level (LOW -> NORMAL -> HIGH -> URGENT and beyond) per
`aging_interval_s` waited, and a LOW request that waited three intervals is
served before a fresh URGENT one: nothing starves. Ties go to the earlier
arrival. The queue holds at most `max_size` requests; one more is refused with
`Overloaded` (RESOURCE_EXHAUSTED). Requests whose deadline passed are taken out
by `expire` before they could reach a worker. The clock is injected.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from wicore.errors import ConfigError, Overloaded
from wicore.scheduler.state import QueuedRequest


class RequestQueue:
    def __init__(
        self, max_size: int, aging_interval_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_size < 1:
            raise ConfigError(f"scheduler.max_queue_size must be >= 1, got {max_size}")
        if aging_interval_s <= 0:
            raise ConfigError(f"scheduler.aging_interval_s must be > 0, got {aging_interval_s}")
        self.max_size = max_size
        self.aging_interval_s = aging_interval_s
        self.clock = clock
        self._items: dict[str, QueuedRequest] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._items

    def __iter__(self) -> Iterator[QueuedRequest]:
        return iter(self._items.values())

    def push(self, request: QueuedRequest, *, requeue: bool = False) -> None:
        """Adds a request; `requeue` (a retry after a worker failed) bypasses the bound,
        since the request was admitted once already."""
        if request.request_id in self._items:
            raise ValueError(f"request {request.request_id!r} is queued already")
        if not requeue and len(self._items) >= self.max_size:
            raise Overloaded(f"the scheduler's queue is full ({self.max_size} requests waiting); retry later")
        self._items[request.request_id] = request

    def remove(self, request_id: str) -> QueuedRequest | None:
        """Takes a request out (dispatched, cancelled or failed); None if it is not queued."""
        return self._items.pop(request_id, None)

    def effective_priority(self, request: QueuedRequest, now: float) -> float:
        return int(request.priority) + max(0.0, now - request.arrival) / self.aging_interval_s

    def ordered(self, now: float) -> list[QueuedRequest]:
        """Highest effective priority first; earlier arrivals first among equals."""
        return sorted(self._items.values(), key=lambda r: (-self.effective_priority(r, now), r.seq))

    def expire(self, now: float) -> list[QueuedRequest]:
        """Removes and returns the requests whose deadline has passed, in arrival order."""
        expired = [r for r in self._items.values() if r.deadline is not None and r.deadline <= now]
        for r in expired:
            del self._items[r.request_id]
        return sorted(expired, key=lambda r: r.seq)

    def next_deadline(self) -> float | None:
        deadlines = [r.deadline for r in self._items.values() if r.deadline is not None]
        return min(deadlines, default=None)
