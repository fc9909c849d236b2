"""Runs an `Engine` on its own thread and streams deltas to asyncio callers.

    gRPC handlers (event loop)          engine thread
    ───────────────────────────         ─────────────────────────────
    generate() ── inbox: add ─────────▶ engine.add_request()
    (cancel)   ── inbox: abort ───────▶ engine.abort_request()
    abort_all() ── inbox: abort_all ──▶ every request fails (orphans of a dropped worker)
    resident_hashes() ── inbox: snapshot ▶ engine.resident_hashes()   (heartbeats)
    queue.get() ◀─ call_soon_threadsafe ─ engine.step() -> TextStream.push()
                   (once per step and loop)

A caller that falls behind the engine (a slow client, a busy event loop) gets the
deltas waiting in its queue merged into one, so the messages per request follow
what the caller can take, not the engine's step rate.

With an offloader (KV offload to the tier service, `wicore.worker.offload`), the
pool hands reclaimed blocks to it from the engine thread, and `generate` first
loads the request's prefix blocks that are neither on the device nor computed yet
(one Lookup + one GetBlocks) and sends them ahead of the request (inbox: install),
so the admission finds them in the prefix cache and computes only the rest.

The engine is touched by its thread only. A stop string found by the text
stream finishes the request and aborts it in the engine in the same step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from wicore.errors import InvalidRequest, NotReady, WicoreError, WorkerUnavailable
from wicore.kv.hashing import BlockHash
from wicore.tracing import tracer
from wicore.worker.engine import Engine
from wicore.worker.engine_types import EngineRequest, EngineStats, StepOutput
from wicore.worker.offload import KvOffloader, Reload
from wicore.worker.output import Delta, TextStream
from wicore.worker.threads import EngineThread

log = logging.getLogger(__name__)
_tracer = tracer(__name__)


@dataclass(slots=True)
class _Active:
    stream: TextStream
    queue: asyncio.Queue[Delta | BaseException]
    loop: asyncio.AbstractEventLoop


class AsyncEngine:
    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        offloader: KvOffloader | None = None,
        thread: EngineThread | None = None,
    ) -> None:
        """`thread`: the one that loaded the model and built `engine` (see `wicore.worker.threads`);
        by default a thread of its own."""
        self.engine = engine
        self.tokenizer = tokenizer
        self.offloader = offloader
        self.costs = engine.costs
        if offloader is not None:
            engine.enable_offload(offloader.spill, offloader.observe)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._active: dict[str, _Active] = {}
        self._stats = engine.stats()
        self._stopped = False
        self._thread = thread if thread is not None else EngineThread()
        self._running: concurrent.futures.Future[None] | None = None

    def start(self) -> None:
        self._running = self._thread.submit(self._run)
        self._running.add_done_callback(_log_failure)

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        if self._running is not None:
            concurrent.futures.wait([self._running], timeout=10)
        self._thread.close()

    @property
    def num_active(self) -> int:
        return len(self._active)

    def stats(self) -> EngineStats:
        return self._stats

    async def generate(
        self, request: EngineRequest, stop: tuple[str, ...] = (), resumed: int = 0
    ) -> AsyncIterator[Delta]:
        """Yields deltas until the request finishes; aborts it if the caller goes away.

        `resumed`: the prompt's last tokens are output another worker already streamed
        (a resumed request): they count as completion tokens and their text is not sent again.
        """
        if self._stopped:
            raise NotReady("worker is shutting down")
        stream = TextStream(self.tokenizer, stop, prompt_tokens=len(request.prompt_token_ids) - resumed)
        for token in request.prompt_token_ids[len(request.prompt_token_ids) - resumed :]:
            stream.push([token], None)  # sent already, one per step as then: the text is dropped
        active = _Active(stream, asyncio.Queue(), asyncio.get_running_loop())
        if self.offloader is not None:
            await self._preload(request)
        self._send("add", (request, active))
        finished = False
        try:
            held: BaseException | None = None  # an error behind merged deltas, raised after them
            while True:
                item = held if held is not None else await active.queue.get()
                held = None
                while isinstance(item, Delta) and item.finish_reason is None and not active.queue.empty():
                    # The caller fell behind the engine: the waiting deltas go out as one message.
                    following = active.queue.get_nowait()
                    if isinstance(following, BaseException):
                        held = following
                        break
                    item = item.merged(following)
                if isinstance(item, BaseException):
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._send("abort", request.request_id)

    def abort_all(self, reason: str) -> None:
        """Fails every request in flight with UNAVAILABLE (their caller gave up on this worker)."""
        self._send("abort_all", reason)

    async def resident_hashes(self) -> frozenset[BlockHash]:
        """A snapshot of the device prefix cache, taken on the engine thread between steps."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[frozenset[BlockHash]] = loop.create_future()
        self._send("snapshot", (loop, future))
        return await future

    async def _preload(self, request: EngineRequest) -> None:
        """Loads the prefix blocks after the device's from the tiers; never fails the request."""
        assert self.offloader is not None
        try:
            chain = self.engine.prefix_chain(request)
            start = self.engine.device_prefix(chain)
            if start < len(chain):
                with _tracer.start_as_current_span("worker.prefix_reload") as span:
                    reload = await self.offloader.load(chain[start:])
                    if span.is_recording():
                        span.set_attributes(_reload_attributes(len(chain), start, reload))
                if reload.kv:
                    self._send("install", (chain, start, reload.kv))
        except Exception:
            log.exception(
                "loading request %s's prefix from the tiers failed; computing it", request.request_id
            )

    def _send(self, kind: str, payload: Any) -> None:
        self._inbox.put((kind, payload))
        self._wake.set()

    def _run(self) -> None:
        while not self._stopped:
            self._drain_inbox()
            if not self.engine.has_unfinished():
                self._stats = self.engine.stats()
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:
                log.exception("engine step failed; failing %d requests", len(self._active))
                self._fail_all(exc)
                continue
            deliveries: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Delta]]] = {}
            for out in outputs:
                active = self._active.get(out.request_id)
                if active is None:
                    continue
                delta = _push(active.stream, out)
                if delta.finish_reason is not None:
                    del self._active[out.request_id]
                    delta.times = out.times
                    if not out.finished:  # ended by a stop string
                        self.engine.abort_request(out.request_id)
                        if out.times is not None:
                            out.times.finished = time.time()
                deliveries.setdefault(active.loop, []).append((active.queue, delta))
            for loop, items in deliveries.items():  # one wake-up of each event loop per step
                loop.call_soon_threadsafe(_deliver, items)
            self._stats = self.engine.stats()
        self._fail_all(NotReady("worker stopped"))

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                request, active = payload
                try:
                    self.engine.add_request(request)
                except (ValueError, WicoreError) as exc:  # a duplicate id, a request too big
                    error = exc if isinstance(exc, WicoreError) else InvalidRequest("request_id", str(exc))
                    active.loop.call_soon_threadsafe(active.queue.put_nowait, error)
                    continue
                self._active[request.request_id] = active
            elif kind == "abort" and self._active.pop(payload, None) is not None:
                self.engine.abort_request(payload)
            elif kind == "abort_all":
                if self._active:
                    log.warning("aborting %d orphaned requests: %s", len(self._active), payload)
                self._fail_all(WorkerUnavailable(payload))
            elif kind == "install":
                chain, start, kv = payload
                try:
                    self.engine.install_blocks(chain, start, kv)
                except Exception:  # the blocks are recomputed instead
                    log.exception("installing %d loaded blocks failed", len(kv))
            elif kind == "snapshot":
                loop, future = payload
                loop.call_soon_threadsafe(_set_result, future, self.engine.resident_hashes())

    def _fail_all(self, exc: BaseException) -> None:
        for request_id, active in list(self._active.items()):
            self.engine.abort_request(request_id)
            active.loop.call_soon_threadsafe(active.queue.put_nowait, exc)
        self._active.clear()


def _reload_attributes(chain: int, on_device: int, reload: Reload) -> dict[str, int]:
    attributes = {"wicore.prefix.blocks": chain, "wicore.prefix.device_blocks": on_device,
                  "wicore.reload.blocks": len(reload.kv)}  # fmt: skip
    attributes |= {f"wicore.reload.{source}_blocks": n for source, n in reload.blocks.items()}
    attributes |= {f"wicore.reload.{source}_bytes": n for source, n in reload.bytes.items()}
    return attributes


def _push(stream: TextStream, out: StepOutput) -> Delta:
    """One step's tokens into the request's text stream. Several tokens (speculative decoding)
    with stop strings go in one at a time, so a stop string ends the output at the token that
    completes it, as it would without speculation."""
    tokens = out.new_token_ids
    if len(tokens) <= 1 or not stream.stop:
        return stream.push(tokens, out.finish_reason, out.cached_tokens, out.logprobs)
    delta: Delta | None = None
    for i, token in enumerate(tokens):
        last = i == len(tokens) - 1
        one = stream.push(
            [token], out.finish_reason if last else None, out.cached_tokens, out.logprobs[i : i + 1]
        )
        delta = one if delta is None else delta.merged(one)
        if one.finish_reason is not None:
            break
    assert delta is not None
    return delta


def _log_failure(running: concurrent.futures.Future[None]) -> None:
    if not running.cancelled() and running.exception() is not None:
        log.error("the engine loop stopped", exc_info=running.exception())


def _deliver(items: list[tuple[asyncio.Queue[Any], Delta]]) -> None:
    for target, delta in items:
        target.put_nowait(delta)


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():  # the caller may have gone away
        future.set_result(value)
