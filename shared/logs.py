"""One-line logs that name the service, as text or JSON (`observability.log_format`).

A JSON line carries `service`, and, inside a request, its `request_id`, `trace_id` and
`span_id` (the ids Jaeger shows), so a log line leads to its trace:

    {"time": "2026-11-30T04:12:03.120Z", "level": "WARNING", "service": "scheduler",
     "logger": "wicore.scheduler.servicer", "message": "...", "request_id": "9f1c...",
     "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "span_id": "00f067aa0ba902b7"}

The request id is bound with `request_scope(request_id)` where a service takes a request
in (a context variable: it follows the request's task and the tasks it starts). Logs
never carry prompt or output text at INFO or above: messages name requests by id.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator

from opentelemetry import trace

from wicore.config import LogFormat

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("wicore_request_id", default="")


@contextlib.contextmanager
def request_scope(request_id: str) -> Iterator[None]:
    """Log lines written inside carry `request_id`."""
    token = _request_id.set(request_id)
    try:
        yield
    finally:
        # An async generator's scope can be closed from another context (a cancelled call's
        # stream, finalized later): there is nothing of ours to undo in that one.
        with contextlib.suppress(ValueError):
            _request_id.reset(token)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = _request_id.get()
        if request_id:
            line["request_id"] = request_id
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            line["trace_id"] = trace.format_trace_id(context.trace_id)
            line["span_id"] = trace.format_span_id(context.span_id)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def setup_logging(service: str, level: str = "INFO", log_format: LogFormat = LogFormat.TEXT) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == LogFormat.JSON:
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s [{service}] %(name)s: %(message)s")
        )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
