"""The performance guide's MoR workload types: the public `workload_type` field,
checked at the gateway and routed on by the scheduler."""

from __future__ import annotations

import enum

from wicore.errors import InvalidRequest


class WorkloadType(enum.Enum):
    DEFAULT = "default"
    CREATIVE_WRITING = "creative_writing"
    CODE_GENERATION = "code_generation"
    SIMPLE_QA = "simple_qa"


def parse_workload_type(value: str, field: str = "workload_type") -> WorkloadType:
    """The workload type named `value` ("" means default); InvalidRequest naming the field."""
    try:
        return WorkloadType(value or WorkloadType.DEFAULT.value)
    except ValueError:
        known = ", ".join(w.value for w in WorkloadType)
        raise InvalidRequest(field, f"{value[:64]!r} is not one of {known} (or empty)") from None
