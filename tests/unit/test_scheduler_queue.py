"""The scheduler's queue: priority order, aging, the size bound, deadlines, cancel."""

from __future__ import annotations

import pytest

from wicore.errors import ConfigError, Overloaded
from wicore.scheduler.request_queue import RequestQueue
from wicore.scheduler.state import Priority

from scheduling import request


def ids(queue: RequestQueue, now: float) -> list[str]:
    return [r.request_id for r in queue.ordered(now)]


def test_higher_priority_first_then_arrival_order() -> None:
    q = RequestQueue(max_size=10, aging_interval_s=10.0)
    for seq, (rid, prio) in enumerate(
        [("n1", Priority.NORMAL), ("low", Priority.LOW), ("u", Priority.URGENT), ("n2", Priority.NORMAL),
         ("h", Priority.HIGH)]
    ):  # fmt: skip
        q.push(request(rid, seq=seq, arrival=100.0, priority=prio))
    assert ids(q, 100.0) == ["u", "h", "n1", "n2", "low"]


def test_aging_lets_a_low_request_overtake_a_fresh_urgent_one() -> None:
    q = RequestQueue(max_size=10, aging_interval_s=10.0)
    q.push(request("old-low", seq=0, arrival=0.0, priority=Priority.LOW))
    q.push(request("fresh-urgent", seq=1, arrival=25.0, priority=Priority.URGENT))
    # At 25 s the LOW request is worth 0 + 2.5 levels, the URGENT one 3.
    assert ids(q, 25.0) == ["fresh-urgent", "old-low"]
    assert q.effective_priority(q.ordered(25.0)[1], 25.0) == 2.5
    # Both age at the same rate, so the gap closes only by the LOW one's head start:
    # at 40 s: 4.0 against 3 + 1.5 = 4.5; LOW never passes an URGENT arriving 25 s later...
    assert ids(q, 40.0) == ["fresh-urgent", "old-low"]
    # ... but it does pass one arriving 31 s after it (3.1 > 3.0).
    q.remove("fresh-urgent")
    q.push(request("later-urgent", seq=2, arrival=31.0, priority=Priority.URGENT))
    assert ids(q, 31.0) == ["old-low", "later-urgent"]


def test_full_queue_refuses_with_a_clear_message_but_takes_retries() -> None:
    q = RequestQueue(max_size=2, aging_interval_s=10.0)
    q.push(request("a", seq=0))
    q.push(request("b", seq=1))
    with pytest.raises(
        Overloaded, match=r"the scheduler's queue is full \(2 requests waiting\); retry later"
    ):
        q.push(request("c", seq=2))
    assert len(q) == 2 and "c" not in q
    q.push(request("retry", seq=3), requeue=True)  # admitted before: a failed worker is no reason to drop it
    assert len(q) == 3
    with pytest.raises(ValueError, match="queued already"):
        q.push(request("a", seq=4), requeue=True)


def test_expire_takes_out_exactly_the_requests_past_their_deadline() -> None:
    q = RequestQueue(max_size=10, aging_interval_s=10.0)
    q.push(request("late", seq=0, deadline=101.0))
    q.push(request("never", seq=1, deadline=None))
    q.push(request("later", seq=2, deadline=103.0))
    q.push(request("now", seq=3, deadline=102.0))
    assert q.next_deadline() == 101.0
    assert q.expire(100.5) == []
    assert [r.request_id for r in q.expire(102.0)] == ["late", "now"]  # arrival order; == deadline expires
    assert ids(q, 102.0) == ["never", "later"] and q.next_deadline() == 103.0


def test_cancel_removes_a_queued_request() -> None:
    q = RequestQueue(max_size=10, aging_interval_s=10.0)
    q.push(request("a", seq=0))
    q.push(request("b", seq=1))
    removed = q.remove("a")
    assert removed is not None and removed.request_id == "a"
    assert q.remove("a") is None
    assert ids(q, 100.0) == ["b"]


@pytest.mark.parametrize(
    ("size", "aging", "named"),
    [(0, 10.0, "scheduler.max_queue_size"), (5, 0.0, "scheduler.aging_interval_s")],
)
def test_bad_settings_are_named(size: int, aging: float, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        RequestQueue(max_size=size, aging_interval_s=aging)
