"""BatchOptimizer: memory fit, batch limits, holding, starvation, deadlines, orphans,
placement hints and the death-spiral guard, on constructed states with a manual clock."""

from __future__ import annotations

import pytest

from wicore.config import SchedulerConfig
from wicore.scheduler.batcher import BatchOptimizer, Plan, kv_need
from wicore.scheduler.hints import PlacementHints
from wicore.scheduler.registry import WorkerInfo, WorkerRegistry
from wicore.scheduler.request_queue import RequestQueue
from wicore.scheduler.router import make_router
from wicore.scheduler.state import Priority, QueuedRequest

from clocks import ManualClock
from scheduling import hashes, request, worker


class Scene:
    """A registry, a queue and a batcher sharing one manual clock."""

    def __init__(self, *workers: WorkerInfo, **settings: object) -> None:
        self.clock = ManualClock(100.0)
        self.config = SchedulerConfig(**settings)  # type: ignore[arg-type]
        self.registry = WorkerRegistry(timeout_s=5.0, clock=self.clock)
        for w in workers:
            self.registry.register(w)
        self.queue = RequestQueue(self.config.max_queue_size, self.config.aging_interval_s, self.clock)
        self.hints = PlacementHints(ttl_s=3.0)
        self.batcher = BatchOptimizer(self.config, make_router(self.config), self.hints, orphan_timeout_s=5.0)
        self._seq = 0

    def add(self, *requests: QueuedRequest) -> None:
        for r in requests:
            r.seq = self._seq
            self._seq += 1
            self.queue.push(r)

    def plan(self) -> Plan:
        return self.batcher.plan(self.clock.now, self.queue, self.registry)

    def placed(self) -> list[tuple[str, str]]:
        return [(a.request.request_id, a.worker.worker_id) for a in self.plan().assignments]


def test_kv_need_counts_prompt_and_new_tokens_minus_the_resident_prefix() -> None:
    w = worker("w", total_blocks=50)
    assert kv_need(request("r", prompt=100, new=60), w, 0) == 10  # ceil(160 / 16)
    assert kv_need(request("r", prompt=100, new=60), w, 3) == 7
    assert kv_need(request("r", prompt=100, new=None), w, 0) == 23  # the worker's default: 256 new
    assert kv_need(request("r", prompt=2000, new=2000), w, 0) == 50  # capped at the whole pool


def test_requests_are_admitted_while_their_kv_fits_the_free_blocks() -> None:
    s = Scene(worker("w", total_blocks=100, reserved=80))
    s.add(request("fits", prompt=100, new=60, priority=Priority.HIGH))  # 10 blocks
    s.add(request("too-big", prompt=100, new=76))  # 11 blocks: only 10 left after "fits"
    s.add(request("small", prompt=10, new=6, priority=Priority.LOW))  # 1 block: fits beside "fits"
    assert s.placed() == [("fits", "w"), ("small", "w")]
    w = s.registry.workers["w"]
    assert (w.reserved_blocks, w.inflight) == (91, 2)
    s.registry.release("w", w.epoch, 10)  # "fits" ended
    assert s.placed() == [("too-big", "w")]
    assert len(s.queue) == 0 and (w.reserved_blocks, w.inflight) == (92, 2)


def test_a_prefix_resident_on_the_worker_needs_no_new_blocks() -> None:
    s = Scene(worker("w", total_blocks=100, reserved=93))
    s.add(request("r", prompt=100, new=60, blocks=6, device={"w": 3}))  # 10 - 3 resident = 7
    assert s.placed() == [("r", "w")]
    assert s.registry.workers["w"].reserved_blocks == 100


def test_at_most_max_batch_size_in_flight_per_worker() -> None:
    s = Scene(worker("a"), worker("b"), max_batch_size=2)
    s.add(*(request(f"r{i}") for i in range(5)))
    # No prefix anywhere: every placement is a miss, and misses alternate (no pile-up).
    assert s.placed() == [("r0", "a"), ("r1", "b"), ("r2", "a"), ("r3", "b")]
    assert s.placed() == []
    a = s.registry.workers["a"]
    s.registry.release("a", a.epoch, 8)
    assert s.placed() == [("r4", "a")]


def test_same_prefix_requests_follow_the_first_placement_within_a_round() -> None:
    s = Scene(worker("a"), worker("b"))
    s.add(request("warm", prompt=400, blocks=24, tag="x"))
    s.add(request("other", prompt=400, blocks=24, tag="y"))
    s.add(*(request(f"x{i}", prompt=400, blocks=24, tag="x") for i in range(3)))
    # "warm" is placed first (a); its blocks are hinted there, so the other x-requests follow
    # it rather than spread, while "other" (a different prefix) takes the idle worker.
    assert s.placed() == [("warm", "a"), ("other", "b"), ("x0", "a"), ("x1", "a"), ("x2", "a")]
    assert s.hints.prefix_len("a", hashes(24, "x"), s.clock.now) == 24
    s.clock.now += 3.5  # hints expire once the worker's own report has reached Redis
    assert s.hints.prefix_len("a", hashes(24, "x"), s.clock.now) == 0


def test_mor_waits_for_a_busy_holder_at_most_the_prefill_it_saves() -> None:
    """The holder of r's 24 prompt blocks has no free slot, the other worker one: recomputing
    the blocks there costs 384 tokens, 0.384 s at the assumed 1,000 tokens/s, so r waits that
    long for the holder while the request behind it (no prefix) is placed; then r goes to the
    other worker."""
    s = Scene(worker("holder", inflight=8), worker("other", inflight=6))
    s.add(request("r", prompt=400, blocks=24, device={"holder": 24}), request("q", prompt=40))
    plan = s.plan()
    assert [(a.request.request_id, a.worker.worker_id) for a in plan.assignments] == [("q", "other")]
    assert plan.wake_at == pytest.approx(100.0 + 384 / 1000)
    s.clock.now += 0.38
    assert s.placed() == []  # still within its budget, counted from the first time it was held
    s.clock.now += 0.01
    assert s.placed() == [("r", "other")]


def test_a_held_request_takes_the_holders_slot_when_it_frees() -> None:
    s = Scene(worker("holder", inflight=8), worker("other", inflight=7))
    s.add(request("r", prompt=400, blocks=24, device={"holder": 24}))
    assert s.placed() == []
    holder = s.registry.workers["holder"]
    s.registry.release("holder", holder.epoch, 0)
    assert s.placed() == [("r", "holder")]


def test_the_wait_is_priced_with_the_workers_measured_prefill_speed() -> None:
    other, holder = worker("other", inflight=7), worker("holder", inflight=8)
    other.load.prefill_tokens_per_s = holder.load.prefill_tokens_per_s = 3840.0  # 384 tokens in 0.1 s
    s = Scene(holder, other)
    s.add(request("r", prompt=400, blocks=24, device={"holder": 24}))
    assert s.plan().wake_at == pytest.approx(100.1)


def test_no_wait_that_would_end_past_the_deadline_and_none_longer_than_an_aging_interval() -> None:
    s = Scene(worker("holder", inflight=8), worker("other", inflight=7))
    s.add(request("r", prompt=400, blocks=24, device={"holder": 24}, deadline=100.3))  # budget 0.384
    assert s.placed() == [("r", "other")]
    s = Scene(worker("holder", inflight=8), worker("other", inflight=7), aging_interval_s=0.1)
    s.add(request("r", prompt=400, blocks=24, device={"holder": 24}))
    assert s.plan().wake_at == pytest.approx(100.1)


def test_a_request_placed_after_a_wait_starts_afresh_if_it_comes_back() -> None:
    """A failover sends the same request back to the queue: its next wait has a whole budget."""
    s = Scene(worker("holder", inflight=8), worker("other", inflight=7), worker("third", inflight=7))
    r = request("r", prompt=400, blocks=24, device={"holder": 24})
    s.add(r)
    assert s.placed() == [] and r.held_since == 100.0
    s.clock.now = 100.5
    assert s.placed() == [("r", "other")] and r.held_since is None
    r.exclude = frozenset({"other"})  # "other" failed it: back to the queue, as the servicer does
    s.add(r)
    plan = s.plan()
    assert plan.assignments == [] and plan.wake_at == pytest.approx(100.5 + 0.384)


@pytest.mark.parametrize("policy", ["least_loaded", "round_robin"])
def test_load_only_policies_never_wait(policy: str) -> None:
    s = Scene(worker("holder", inflight=8), worker("other", inflight=7), routing_policy=policy)
    s.add(request("r", prompt=400, blocks=24, device={"holder": 24}))
    assert s.placed() == [("r", "other")]


def test_no_wait_for_a_holder_far_above_max_imbalance_or_when_nothing_is_saved() -> None:
    s = Scene(worker("holder", inflight=8), worker("other", inflight=2))
    # with a slot free the holder would run 7, 5 above other (max_imbalance 4): MoR would not pick it
    s.add(request("r", prompt=400, blocks=24, device={"holder": 24}))
    assert s.placed() == [("r", "other")]
    s = Scene(worker("holder", inflight=8), worker("other", inflight=7))
    s.add(request("r2", prompt=400, blocks=24, device={"holder": 24, "other": 24}))
    assert s.placed() == [("r2", "other")]  # both hold it: nothing to wait for


def test_max_wait_time_holds_a_partial_batch() -> None:
    s = Scene(worker("w"), max_wait_time_s=0.05, max_batch_size=4)
    s.add(request("a"), request("b"))
    plan = s.plan()
    assert plan.assignments == [] and plan.wake_at == 100.05
    s.clock.now = 100.05
    assert s.placed() == [("a", "w"), ("b", "w")]
    s.add(*(request(f"f{i}") for i in range(4)))  # a whole batch waiting: no hold
    assert [rid for rid, _ in s.placed()] == ["f0", "f1"]  # two slots were left


def test_backfill_until_the_blocked_request_has_waited_an_aging_interval() -> None:
    s = Scene(worker("w", total_blocks=100, reserved=95), aging_interval_s=10.0)
    s.add(request("big", prompt=100, new=60, priority=Priority.HIGH))  # 10 blocks: does not fit
    s.add(request("small", prompt=10, new=6))
    assert s.placed() == [("small", "w")]  # young and blocked: smaller ones go past it
    s.clock.now += 10.0
    s.add(request("small2", prompt=10, new=6, arrival=110.0))
    assert s.placed() == []  # starving: nothing passes it any more
    w = s.registry.workers["w"]
    s.registry.release("w", w.epoch, 96)
    assert s.placed() == [("big", "w"), ("small2", "w")]


def test_deadlines_expire_in_the_queue_and_wake_the_planner() -> None:
    s = Scene(worker("w", inflight=8))
    s.add(request("soon", deadline=100.5), request("later", deadline=102.0), request("none"))
    plan = s.plan()
    assert plan.assignments == [] and plan.expired == [] and plan.wake_at == 100.5
    s.clock.now = 101.0
    plan = s.plan()
    assert [r.request_id for r in plan.expired] == ["soon"] and plan.wake_at == 102.0
    assert [r.request_id for r in s.queue.ordered(s.clock.now)] == ["later", "none"]


def test_requests_without_a_live_worker_fail_after_the_orphan_timeout() -> None:
    s = Scene(worker("a"))
    r = request("r")
    r.exclude = frozenset({"a"})  # it failed on a already
    s.add(r)
    plan = s.plan()
    assert plan.orphaned == [] and plan.wake_at == 105.0
    s.registry.register(worker("b"))
    assert s.placed() == [("r", "b")]  # a worker came back in time
    r2 = request("r2")
    r2.exclude = frozenset({"a", "b"})
    s.add(r2)
    s.plan()
    s.clock.now += 5.0
    assert [x.request_id for x in s.plan().orphaned] == ["r2"] and len(s.queue) == 0


def test_priorities_and_aging_decide_who_gets_the_last_slot() -> None:
    s = Scene(worker("w", inflight=7), aging_interval_s=10.0)
    s.add(request("low-old", priority=Priority.LOW, arrival=75.0))  # 2.5 levels by now
    s.add(request("high", priority=Priority.HIGH))
    assert s.placed() == [("low-old", "w")]


def test_expired_hints_are_dropped_as_new_ones_come() -> None:
    """Hints past their ttl are never used again: they must not pile up (one per block
    placed, until max_entries) in a scheduler that runs for long."""
    hints = PlacementHints(ttl_s=3.0)
    hints.record("a", hashes(24, "x"), 100.0)
    hints.record("a", hashes(8, "y"), 102.0)
    assert len(hints) == 32
    hints.record("b", hashes(4, "z"), 104.0)  # x's hints are 4 s old now: gone
    assert len(hints) == 12
    assert hints.prefix_len("a", hashes(8, "y"), 104.0) == 8
    hints.record("a", hashes(8, "y"), 104.5)  # recorded again: kept, and moved to the back
    hints.record("b", hashes(1, "w"), 107.2)  # z's (104.0) are past 3 s; y's (104.5) are not
    assert len(hints) == 9 and hints.prefix_len("a", hashes(8, "y"), 107.2) == 8
