"""Driving a `completions.Generation` from an asyncio handler: the engine thread's events
reach the handler's event loop (`Dispatcher`, `Pipe`, one wake-up of the loop per batch of
events), and the generation is submitted (`start`), then answered whole (`collect`) or as
server-sent events (`stream`). A handler that is cancelled (its client gone) or fails aborts
every engine request it still has, so nothing keeps running for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator

from mlx_sched.server.completions import Generation
from mlx_sched.server.engine_thread import (
    Accepted,
    Delta,
    EngineThread,
    Overloaded,
    Rejected,
    Unavailable,
)
from mlx_sched.server.protocol import ApiError


class Dispatcher:
    """Delivers the engine thread's events on one event loop, with one wake-up of the loop
    per batch of events (a step produces an event per running request) rather than one per
    event."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, object]] = []

    def post(self, queue: asyncio.Queue, event) -> None:  # any thread
        with self._lock:
            wake = not self._pending
            self._pending.append((queue, event))
        if wake:
            with contextlib.suppress(RuntimeError):  # a closed loop: the server is gone
                self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._pending = self._pending, []
        for queue, event in items:
            queue.put_nowait(event)


_dispatchers: dict[asyncio.AbstractEventLoop, Dispatcher] = {}


def dispatcher() -> Dispatcher:
    """The running loop's Dispatcher."""
    loop = asyncio.get_running_loop()
    d = _dispatchers.get(loop)
    if d is None:
        for old in [x for x in _dispatchers if x.is_closed()]:
            del _dispatchers[old]
        d = _dispatchers[loop] = Dispatcher(loop)
    return d


class Pipe:
    """The engine thread's events for one generation, on the handler's event loop."""

    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()
        self._dispatcher = dispatcher()

    def sink(self, event) -> None:  # called on the engine thread
        self._dispatcher.post(self.queue, event)

    async def get(self):
        return await self.queue.get()


async def start(gen: Generation, engine: EngineThread) -> Pipe:
    """Submit and wait for the engine's answer; ApiError 503/400 when refused."""
    pipe = Pipe()
    try:
        engine.submit(gen.submissions, pipe.sink)
    except Overloaded as e:
        raise ApiError(
            503, str(e), code="overloaded", type="server_error", headers={"Retry-After": "1"}
        ) from None
    except Unavailable as e:
        raise ApiError(503, str(e), code="unavailable", type="server_error") from None
    try:
        event = await pipe.get()
    except asyncio.CancelledError:  # the handler is gone before the engine answered
        abort_unfinished(gen, engine)
        raise
    if isinstance(event, Rejected):
        raise ApiError(400, event.message, param="prompt" if not gen.chat else "messages")
    assert isinstance(event, Accepted), event
    return pipe


def abort_unfinished(gen: Generation, engine: EngineThread) -> None:
    for rid in gen.rids:
        if rid not in gen.ended:
            engine.abort(rid)
            gen.ended.add(rid)


async def collect(gen: Generation, pipe: Pipe, engine: EngineThread) -> dict:
    """Run to the end; the whole response object."""
    try:
        while not gen.finished:
            d = await pipe.get()
            _, abort = gen.on_delta(d)
            if abort:
                engine.abort(d.request_id)
            if d.error is not None:
                raise _engine_error(d)
        return gen.response()
    finally:  # cancelled (client gone) or failed: nothing keeps running for it
        abort_unfinished(gen, engine)


async def stream(gen: Generation, pipe: Pipe, engine: EngineThread) -> AsyncIterator[bytes]:
    """Server-sent events: one chunk per choice per step with news, then usage (when asked)
    and `data: [DONE]`."""
    started: set[int] = set()
    try:
        if gen.chat:  # the role comes first, as OpenAI sends it
            for c in gen.all_choices():
                started.add(c.index)
                yield _sse(gen.chunk(c, "", 0, first=True))
        while not gen.finished:
            d = await pipe.get()
            news, abort = gen.on_delta(d)
            if abort:
                engine.abort(d.request_id)
            if d.error is not None:
                yield _sse(_engine_error(d).body())
                return
            for choice, text, kept in news:
                if not (text or choice.done or gen.wants_tokens):
                    continue  # only held-back bytes (a split character, a possible stop)
                yield _sse(gen.chunk(choice, text, kept, first=choice.index not in started))
                started.add(choice.index)
        opts = gen.body.stream_options
        if opts is not None and opts.include_usage:
            yield _sse(gen.usage_chunk())
        yield b"data: [DONE]\n\n"
    finally:
        abort_unfinished(gen, engine)


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _engine_error(d: Delta) -> ApiError:
    """A request the engine ended on its own: it failed (500), or it could not be served."""
    if d.error.startswith("engine failure"):
        return ApiError(500, d.error, type="server_error", code="engine_error")
    return ApiError(400, f"the request could not be served: {d.error}", code="unservable")
