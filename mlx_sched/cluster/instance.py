"""One instance of a cluster: an `Engine` behind a small, plain-data interface.

`InstanceServer` is what runs where the engine lives: in this process (`LocalInstance`)
or in a Ray actor of its own (`ray_backend.RayInstance`). Every method takes and returns
plain, picklable data (token lists, `Load`, `StepReport`, `RequestState`, numpy KV
chunks), so the global scheduler's code is the same for both backends.
"""

from __future__ import annotations

import collections
import dataclasses
import math

from mlx_sched.serve.handoff import RequestState
from mlx_sched.serve.request import RequestError, SamplingParams, Status


@dataclasses.dataclass
class Load:
    """What dispatch and migration policies read of an instance."""

    num_pages: int  # usable pages (the null page excluded)
    free_pages: int
    running: int  # sequences running (decode slots held)
    waiting: int  # requests waiting or swapped out
    hol_pages: int  # pages the head-of-line waiting request needs (0: none waiting)
    max_seqs: int
    high_priority: int = 0  # running requests with priority > 0
    page_size: int = 16

    def freeness(self, headroom_pages: int = 0) -> float:
        """Llumnix's freeness: (free pages - head-of-line demand - headroom kept for
        high-priority requests) / (running + [waiting > 0]); an idle instance is infinitely
        free (ties broken by free pages)."""
        free = self.free_pages - self.hol_pages - headroom_pages * self.high_priority
        busy = self.running + (self.waiting > 0)
        if busy == 0:
            return math.inf
        return free / busy

    def admit(self, pages: int) -> None:
        """Account locally for a request just dispatched here (until the next report)."""
        if self.waiting == 0:
            self.hol_pages = pages
        self.waiting += 1


@dataclasses.dataclass
class Output:
    """A request's new tokens from one step of one instance."""

    request_id: str
    new_tokens: list[list[int]]  # per sequence
    finished: bool
    finish_reasons: list[str | None]
    preemptions: int = 0
    error: str | None = None


@dataclasses.dataclass
class StepReport:
    outputs: list[Output]
    load: Load
    has_work: bool
    now: float  # the instance's clock after the step: the time of its tokens
    compiles: int = 0  # compilations since warm-up


class InstanceServer:
    """An engine, driven through plain-data calls."""

    def __init__(self, engine, name: str = "instance"):
        self.engine, self.name = engine, name
        self._live: set[str] = set()  # requests here that have not reported finishing
        self._aborted_seen = -1  # the engine's abort count at the last look for failures

    # -- requests -------------------------------------------------------------------------

    def add(
        self,
        request_id: str,
        prompt: list[int],
        sampling: SamplingParams,
        client: str = "default",
        priority: int = 0,
        arrival: float | None = None,
        deadline: float | None = None,
    ) -> None:
        self.engine.add_request(prompt, sampling, request_id, client, priority, arrival, deadline)
        self._live.add(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request; a no-op when it already finished here."""
        req = self.engine.requests.get(request_id)
        self._live.discard(request_id)
        if req is not None and not req.is_finished:
            self.engine.abort(request_id)

    def step(self) -> StepReport:
        engine = self.engine
        outputs = []
        if engine.has_work():
            # the engine's per-step token lists are not touched after the step: no copies
            for out in engine.step():
                finished = out.finished
                outputs.append(
                    Output(
                        out.request_id,
                        out.new_tokens,
                        finished,
                        out.finish_reasons,
                        out.request.preemptions,
                    )
                )
                if finished:
                    self._live.discard(out.request_id)
        if engine.totals.aborted != self._aborted_seen:
            outputs += self._failed()
        return self.report(outputs)

    def _failed(self) -> list[Output]:
        """Requests the engine aborted on its own (unschedulable), reported once. Only an
        abort (counted in the engine's totals) can leave one here: step() looks when the
        count has moved."""
        self._aborted_seen = self.engine.totals.aborted
        out = []
        for rid in list(self._live):
            req = self.engine.requests.get(rid)
            if req is None or req.status is Status.ABORTED:
                self._live.discard(rid)
                error = (req.error if req is not None else None) or "aborted by the engine"
                out.append(Output(rid, [[]], True, ["abort"], 0, error))
        return out

    def report(self, outputs=()) -> StepReport:
        return StepReport(
            list(outputs),
            self.load(),
            self.engine.has_work(),
            self.engine.clock(),
            self.compiles(),
        )

    def load(self) -> Load:
        e = self.engine
        sched, pool, cfg = e.sched, e.pool, e.cfg
        head = sched.waiting[0] if sched.waiting else (sched.swapped[0] if sched.swapped else None)
        hol = 0
        if head is not None:
            hol = sum(pool.pages_for(len(s.tokens)) for s in head.live_seqs) * (
                head.sampling.n if len(head.seqs) == 1 else 1
            )
        high = 0
        for r in sched.running:
            if r.priority > 0:
                high += 1
        return Load(
            cfg.num_pages - 1,
            pool.num_available,
            sched.num_running_seqs,
            len(sched.waiting) + len(sched.swapped),
            hol,
            cfg.max_seqs,
            high,
            cfg.page_size,
        )

    def compiles(self) -> int:
        return getattr(self.engine.runner, "compiles_since_warmup", 0)

    def running_requests(self) -> list[tuple[str, int, int, int]]:
        """(id, priority, kv pages, prompt + generated tokens) of each running request that
        can move: the candidates of a migration policy."""
        e = self.engine
        out = []
        for req in e.sched.running:
            if e.movable(req.id) is None:
                s = req.seqs[0]
                out.append((req.id, req.priority, len(s.pages), len(s.tokens)))
        return out

    def check(self) -> None:
        """The page pool's invariants, and every page in use held by exactly as many live
        sequences and hand-over reservations as its reference count says (tests)."""
        e = self.engine
        e.pool.check()
        holders = collections.Counter()
        for req in e.requests.values():
            if not req.is_finished:
                for s in req.seqs:
                    holders.update(s.pages)
        for pages in e._imports.values():
            holders.update(pages)
        counts = {int(p): int(c) for p, c in enumerate(e.pool.refcount) if c}
        if counts != dict(holders):
            raise AssertionError(f"{self.name}: page references {counts} != holders {holders}")

    def summary(self, wall_s: float) -> dict:
        return self.engine.summary(wall_s)

    # -- hand-overs (serve.handoff) -------------------------------------------------------

    def export_request(self, request_id: str) -> RequestState:
        return self.engine.export_request(request_id)

    def progress(self, request_id: str) -> tuple[str, int, int] | None:
        """(status, computed positions, preemptions) of a request, None if it is no longer
        here or finished: what a migration checks between its stages."""
        req = self.engine.requests.get(request_id)
        if req is None or req.is_finished:
            return None
        paused = request_id in self.engine.sched.paused
        status = "paused" if paused else req.status.value
        on_device = req.status is Status.RUNNING
        return status, req.seqs[0].num_computed if on_device else 0, req.preemptions

    def read_kv(self, request_id: str, first: int, last: int):
        return self.engine.read_kv(request_id, first, last)

    def pause(self, request_id: str) -> None:
        self.engine.pause(request_id)

    def resume(self, request_id: str) -> None:
        self.engine.resume(request_id)

    def detach(self, request_id: str) -> RequestState:
        self._live.discard(request_id)
        return self.engine.detach(request_id)

    def reserve_import(self, request_id: str, num_pages: int) -> bool:
        return self.engine.reserve_import(request_id, num_pages)

    def write_kv(self, request_id: str, first: int, kv) -> int:
        """Write a chunk `(k, v)` read by `read_kv`; returns its bytes."""
        k, v = kv
        self.engine.write_kv(request_id, first, k, v)
        return int(k.nbytes + v.nbytes)

    def cancel_import(self, request_id: str) -> None:
        self.engine.cancel_import(request_id)

    def import_request(self, state: RequestState) -> None:
        self.engine.import_request(state)
        self._live.add(state.id)

    def ping(self) -> str:
        return self.name


__all__ = ["InstanceServer", "Load", "Output", "RequestError", "StepReport"]
