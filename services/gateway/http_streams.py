"""The plumbing of an HTTP request to the API: its body read within a limit, its choices
run concurrently, its answer streamed as server-sent events, and all of it cancelled
when the client goes away, so the gRPC calls behind it end and the worker frees their
KV blocks. (Routes and errors: `http_api.py`.)"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from wicore.gateway.frontend import Stream
from wicore.gateway.openai_convert import ApiError
from wicore.v1 import inference_pb2

T = TypeVar("T")
Delta = tuple[int, inference_pb2.GenerateStreamResponse]


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


class ChoiceStreams:
    """A request's choices, one Frontend stream each, pumped by tasks into one queue and read
    in arrival order. `aclose` cancels the tasks, which ends their gRPC calls."""

    def __init__(self, streams: Sequence[Stream]) -> None:
        self._queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self._open = len(streams)
        self._tasks = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(streams)]

    async def _pump(self, index: int, stream: Stream) -> None:
        try:
            async for msg in stream:
                self._queue.put_nowait((index, msg))
            self._queue.put_nowait((index, None))
        except Exception as exc:  # the reader raises it, in order
            self._queue.put_nowait((index, exc))
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _take(self) -> tuple[int, inference_pb2.GenerateStreamResponse | None]:
        index, item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if item is None:
            self._open -= 1
        return index, item

    async def next(self) -> Delta | None:
        """The next delta of any choice; None once all have finished. Raises a choice's error."""
        while self._open:
            index, msg = await self._take()
            if msg is not None:
                return index, msg
        return None

    async def prime(self) -> list[Delta]:
        """Waits for every choice's first delta, so errors that come before any output
        (validation, limits, no worker, context length) are raised before a stream's 200."""
        waiting, first = set(range(len(self._tasks))), []
        while waiting:
            index, msg = await self._take()
            waiting.discard(index)
            if msg is not None:
                first.append((index, msg))
        return first

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class SseResponse(StreamingResponse):
    """Server-sent events; `on_close` runs however the stream ends (done, failed, client gone)."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]) -> None:
        headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self._events, self._on_close = events, on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                await aclose()
            await self._on_close()


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 when over `limit` bytes: by Content-Length, else while reading."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result; if the client hangs up first, `work` is cancelled and ClientGone raised.
    (Call it once the body is read: it waits for the ASGI disconnect message.)"""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientGone()
    return task.result()
