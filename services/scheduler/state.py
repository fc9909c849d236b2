"""The scheduler's vocabulary: what a queued request and its prefix look like.

Plain dataclasses and enums, no protobuf, no sockets: the queue, the batcher and
the router are pure functions of these (and of `WorkerInfo` in registry.py), so
tests build states by hand and check exact decisions.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from wicore.kv.block import StorageTier
from wicore.kv.hashing import BlockHash
from wicore.workload import WorkloadType


class Priority(enum.IntEnum):
    LOW = 0
    NORMAL = 1
    HIGH = 2
    URGENT = 3


# The seed's thresholds: a request's attention score is compared against these;
# a lower threshold sends more of that workload to GPUs, a higher one to CPUs.
WORKLOAD_THRESHOLDS: Mapping[WorkloadType, float] = {
    WorkloadType.CREATIVE_WRITING: 0.3,
    WorkloadType.CODE_GENERATION: 0.5,
    WorkloadType.SIMPLE_QA: 0.7,
    WorkloadType.DEFAULT: 0.5,
}


@dataclass(frozen=True, slots=True)
class PrefixInfo:
    """Where a prompt's reusable blocks sit, as far as Redis said at arrival.

    `hashes` are the chain hashes of the prompt's reusable full blocks (every full
    block but the one holding the last token, as the worker's engine reuses them);
    `device[w]` is how many of them, from the first, worker w holds on its device;
    `tiers[node][i]` is where the tier service named `node` holds block i (None: not
    there). A worker can load only from its own tier (`WorkerInfo.tier_node`): a block
    in another node's tier is, for it, a block to recompute. Only workers with the same
    fingerprint and block size can hold these blocks. Empty when the scheduler has no
    tokenizer; `device` and `tiers` are empty when Redis did not answer.
    """

    hashes: tuple[BlockHash, ...] = ()
    fingerprint: str = ""  # the model fingerprint the hashes were rooted in
    block_size: int = 0
    device: Mapping[str, int] = field(default_factory=dict)
    tiers: Mapping[str, tuple[StorageTier | None, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for node, tiers in self.tiers.items():
            if len(tiers) != len(self.hashes):
                raise ValueError(f"tiers[{node!r}] has {len(tiers)} entries for {len(self.hashes)} hashes")
        for worker_id, n in self.device.items():
            if not 0 <= n <= len(self.hashes):
                raise ValueError(f"device[{worker_id!r}] = {n} is outside [0, {len(self.hashes)}]")

    def tier(self, node: str) -> tuple[StorageTier | None, ...]:
        """Where the tier named `node` holds each block (() when unknown: nothing there)."""
        return self.tiers.get(node, ())

    def to_prefetch(self) -> dict[str, list[BlockHash]]:
        """Per tier, the NVMe blocks of the reusable prefix that no worker holds on its device.

        In each tier the prefix runs while each block is on some device or in that tier; of
        it, the blocks past the longest device prefix that sit on NVMe are worth promoting to
        CPU RAM before a worker of that node asks for them.
        """
        on_device = max(self.device.values(), default=0)
        wanted: dict[str, list[BlockHash]] = {}
        for node, tiers in self.tiers.items():
            for i, block_hash in enumerate(self.hashes):
                if i >= on_device and tiers[i] is None:
                    break
                if i >= on_device and tiers[i] is StorageTier.NVME:
                    wanted.setdefault(node, []).append(block_hash)
        return wanted


@dataclass(slots=True)
class QueuedRequest:
    """One request waiting for a worker. `seq` orders arrivals (ties in priority)."""

    request_id: str
    seq: int
    arrival: float
    prompt_tokens: int
    max_new_tokens: int | None = None  # None: the worker's default
    priority: Priority = Priority.NORMAL
    workload: WorkloadType = WorkloadType.DEFAULT
    model: str = ""
    deadline: float | None = None  # absolute, on the scheduler's clock
    prefix: PrefixInfo = field(default_factory=PrefixInfo)
    exclude: frozenset[str] = frozenset()  # workers that failed it already
    orphaned_since: float | None = None  # when no live worker could take it any more
    held_since: float | None = None  # when it first waited for a busy worker holding its prefix

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1:
            raise ValueError(f"prompt_tokens must be >= 1, got {self.prompt_tokens}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
