"""The one thread that owns an `Engine`.

The engine is not thread-safe: every call into it (add, abort, step, reading its
state for metrics) happens on this thread. Request handlers, on any thread or
event loop, talk to it through one queue of commands, and hear back through the
`sink` they submitted with: a callable the engine thread calls with each event
(`Accepted`, `Rejected`, `Delta`) for their requests, in order. Between steps the
thread takes every queued command; when the engine has no work it sleeps on the
queue.

    thread = EngineThread(engine)
    thread.start()
    thread.submit([Submission("a", prompt, SamplingParams(max_tokens=8))], events.append)
    ...
    thread.shutdown(timeout_s=30)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from mlx_sched.serve.engine import Engine
from mlx_sched.serve.request import RequestError, RequestOutput, SamplingParams


class Unavailable(RuntimeError):
    """The engine takes no new requests: it is shutting down, or it failed."""


class Overloaded(RuntimeError):
    """More requests wait than the configured bound; retry later."""


@dataclasses.dataclass(frozen=True)
class Submission:
    request_id: str
    prompt: list[int]
    sampling: SamplingParams
    client: str = "default"
    priority: int = 0


@dataclasses.dataclass(frozen=True)
class Accepted:
    """Every request of a submission is queued in the engine."""

    request_ids: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rejected:
    """The submission was refused as a whole (nothing of it stays in the engine)."""

    request_id: str  # the request the engine refused
    message: str


@dataclasses.dataclass(frozen=True)
class Delta:
    """One step's news of one request, copied out of the engine on its thread."""

    request_id: str
    tokens: list[list[int]]  # per sequence, this step's new tokens
    logprobs: list[list[float]] | None  # per sequence, theirs (when the request asked)
    finished: bool
    finish_reasons: list[str | None]
    error: str | None = None  # why the engine ended the request, if it did on its own


Event = Accepted | Rejected | Delta
Sink = Callable[[Event], None]


def delta_of(out: RequestOutput) -> Delta:
    req = out.request
    logprobs = None
    if req.sampling.logprobs:
        logprobs = [
            s.logprobs[len(s.logprobs) - len(new) :] if new else []
            for s, new in zip(req.seqs, out.new_tokens, strict=True)
        ]
    return Delta(
        out.request_id, out.new_tokens, logprobs, out.finished, out.finish_reasons, req.error
    )


class EngineThread:
    """Owns `engine`; `max_waiting` bounds the requests not yet admitted (queued here or
    waiting in the engine) before `submit` raises Overloaded."""

    IDLE_WAIT_S = 0.25  # how often an idle engine thread looks at its stop flag

    def __init__(self, engine: Engine, max_waiting: int = 256):
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {max_waiting}")
        self.engine = engine
        self.max_waiting = max_waiting
        self._cmds: queue.Queue = queue.Queue()
        self._sinks: dict[str, Sink] = {}  # engine thread only
        self._lock = threading.Lock()
        self._pending = 0  # submitted requests the engine thread has not taken yet
        self._waiting = 0  # the engine's waiting queue after the last command or step
        self._active = 0  # requests with a sink (published by the engine thread)
        self.draining = False
        self.failure: str | None = None
        self.steps = 0
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    # -- any thread ------------------------------------------------------------------

    def start(self) -> EngineThread:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.failure is None

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet admitted to a step."""
        return self._pending + self._waiting

    @property
    def queued_commands(self) -> int:
        """Submissions, aborts and calls the engine thread has not taken yet."""
        return self._cmds.qsize()

    @property
    def active(self) -> int:
        """Requests accepted and not yet finished."""
        return self._active

    def submit(self, subs: Sequence[Submission], sink: Sink) -> None:
        """Queue `subs` as one unit: the sink hears Accepted (all of them are in the engine)
        or Rejected (none is), then each request's Deltas. Raises Unavailable or Overloaded
        before queueing anything."""
        with self._lock:
            if self.failure is not None:
                raise Unavailable(f"the engine failed: {self.failure}")
            if self.draining or self._stop.is_set():
                raise Unavailable("the server is shutting down")
            if self.waiting + len(subs) > self.max_waiting:
                raise Overloaded(
                    f"{self.waiting} requests are waiting (bound {self.max_waiting}); retry later"
                )
            self._pending += len(subs)
        self._cmds.put(("submit", list(subs), sink))

    def abort(self, request_id: str) -> None:
        """Stop a request if it still runs (a no-op once it finished); frees its pages."""
        self._cmds.put(("abort", request_id, None))

    def call(self, fn: Callable[[Engine], object]) -> concurrent.futures.Future:
        """Run `fn(engine)` on the engine thread between steps; its result in a Future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if not self._thread.is_alive():
            fut.set_exception(Unavailable("the engine thread is not running"))
        else:
            self._cmds.put(("call", fn, fut))
        return fut

    def drain(self) -> None:
        """Stop admitting: every later submit raises Unavailable."""
        with self._lock:
            self.draining = True

    def shutdown(self, timeout_s: float = 30.0) -> int:
        """Stop admitting, let accepted requests finish for up to `timeout_s`, abort the rest
        and stop the thread. Returns how many requests were aborted."""
        self.drain()
        deadline = time.monotonic() + timeout_s
        while self._thread.is_alive() and self._active and time.monotonic() < deadline:
            time.sleep(0.02)
        aborted = 0
        if self._thread.is_alive():
            aborted = self.call(self._abort_all).result()
        self._stop.set()
        self._thread.join()
        return aborted

    # -- the engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._take_commands(block=not self.engine.has_work())
                if self.engine.has_work():
                    self._step()
        except Exception as e:  # a bug in the engine: fail every request, refuse new ones
            logging.exception("the engine thread failed")
            self.failure = f"{type(e).__name__}: {e}"
            for rid, sink in self._sinks.items():
                sink(Delta(rid, [], None, True, [], error=f"engine failure: {self.failure}"))
            self._sinks.clear()
            self._fail_queued()

    def _take_commands(self, block: bool) -> None:
        try:
            cmd = self._cmds.get(timeout=self.IDLE_WAIT_S) if block else self._cmds.get_nowait()
        except queue.Empty:
            return
        while True:
            self._do(*cmd)
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                break
        self._publish()

    def _do(self, kind: str, arg, extra) -> None:
        if kind == "submit":
            self._add(arg, extra)
        elif kind == "abort":
            self._abort(arg)
        else:
            try:
                extra.set_result(arg(self.engine))
            except Exception as e:
                extra.set_exception(e)

    def _add(self, subs: list[Submission], sink: Sink) -> None:
        added = []
        try:
            for s in subs:
                self.engine.add_request(
                    s.prompt, s.sampling, s.request_id, client=s.client, priority=s.priority
                )
                added.append(s.request_id)
        except RequestError as e:
            for rid in added:
                self.engine.abort(rid)
            sink(Rejected(subs[len(added)].request_id, str(e)))
        else:
            for rid in added:
                self._sinks[rid] = sink
            self.prompt_tokens += sum(len(s.prompt) for s in subs)
            sink(Accepted(tuple(added)))
        finally:
            with self._lock:
                self._pending -= len(subs)

    def _abort(self, request_id: str) -> None:
        sink = self._sinks.pop(request_id, None)
        req = self.engine.requests.get(request_id)
        if req is not None and not req.is_finished:
            self.engine.abort(request_id)
        if sink is not None:
            sink(Delta(request_id, [], None, True, ["abort"] * len(req.seqs) if req else []))

    def _abort_all(self, engine: Engine) -> int:
        ids = list(self._sinks)
        for rid in ids:
            self._abort(rid)
        return len(ids)

    def _step(self) -> None:
        outputs = self.engine.step()
        self.steps += 1
        for out in outputs:
            self.generated_tokens += sum(map(len, out.new_tokens))
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue
            sink(delta_of(out))
            if out.finished:
                del self._sinks[out.request_id]
        # requests the engine ended without an output (e.g. never schedulable)
        for rid in [r for r in self._sinks if self.engine.requests[r].is_finished]:
            req = self.engine.requests[rid]
            reasons = [s.finish_reason for s in req.seqs]
            self._sinks.pop(rid)(Delta(rid, [], None, True, reasons, error=req.error))
        self._publish()

    def _publish(self) -> None:
        self._waiting = len(self.engine.sched.waiting)
        self._active = len(self._sinks)

    def _fail_queued(self) -> None:
        while True:
            try:
                kind, arg, extra = self._cmds.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                extra(Rejected(arg[0].request_id, f"engine failure: {self.failure}"))
                with self._lock:
                    self._pending -= len(arg)
            elif kind == "call":
                extra.set_exception(Unavailable(f"the engine failed: {self.failure}"))
