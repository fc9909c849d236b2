"""Placement hints: the prefix blocks a worker is about to hold, before Redis says so.

A worker publishes its resident block hashes to Redis once per heartbeat, so for
up to one interval after a request with a new prefix is placed, Redis does not
know where that prefix lives, and a burst of requests sharing it would scatter
over every worker (each computing the prefix again). The scheduler therefore
remembers, for `ttl_s`, which worker it sent each block hash to and counts those
blocks as resident there. Bounded: entries past `ttl_s` are dropped as new ones come
(they are kept in the order recorded, the oldest first), and the oldest go first past
`max_entries`.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

from wicore.kv.hashing import BlockHash


class PlacementHints:
    def __init__(self, ttl_s: float, max_entries: int = 200_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._placed: collections.OrderedDict[tuple[str, BlockHash], float] = collections.OrderedDict()

    def record(self, worker_id: str, hashes: Sequence[BlockHash], now: float) -> None:
        for h in hashes:
            key = (worker_id, h)
            self._placed[key] = now
            self._placed.move_to_end(key)
        cutoff = now - self.ttl_s
        while self._placed and (
            len(self._placed) > self.max_entries or next(iter(self._placed.values())) < cutoff
        ):
            self._placed.popitem(last=False)

    def __len__(self) -> int:
        return len(self._placed)

    def prefix_len(self, worker_id: str, hashes: Sequence[BlockHash], now: float) -> int:
        """How many of `hashes`, from the first, were sent to `worker_id` within ttl_s."""
        cutoff = now - self.ttl_s
        n = 0
        for h in hashes:
            placed = self._placed.get((worker_id, h))
            if placed is None or placed < cutoff:
                break
            n += 1
        return n

    def forget(self, worker_id: str) -> None:
        """A worker left: its hints are wrong now."""
        for key in [k for k in self._placed if k[0] == worker_id]:
            del self._placed[key]
