"""Domain errors and their gRPC status codes.

Services raise these; the one interceptor in `wicore.server` turns them into
status codes. A `grpc.aio.AioRpcError` from a downstream hop keeps its code and
message, so a worker's INVALID_ARGUMENT reaches the client unchanged.
"""

from __future__ import annotations

import grpc


class WicoreError(Exception):
    """Base of every error a service reports to its caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidRequest(WicoreError):
    """A field of the request is invalid; the message names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class Unauthenticated(WicoreError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Overloaded(WicoreError):
    """Too much work, or a request too large for the model's context."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ModelNotFound(WicoreError):
    code = grpc.StatusCode.NOT_FOUND


class NotFound(WicoreError):
    code = grpc.StatusCode.NOT_FOUND


class WorkerUnavailable(WicoreError):
    """No live worker can take the request, or the worker died."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(WicoreError):
    """The client's deadline passed before the work could be done (e.g. still queued)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotReady(WicoreError):
    """The service is up but cannot serve yet (model not loaded, shutting down)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ConfigError(ValueError):
    """Configuration file, environment or flag with a bad key or value."""
