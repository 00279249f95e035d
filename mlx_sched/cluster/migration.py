"""Moving a running request between instances, and when to.

`Move` carries one request's KV from a source instance to a destination, a chunk of at
most `chunk_pages` pages per cluster step (so a long context stalls neither side), in
one of two ways:

- **migration** (Llumnix): the request keeps decoding on the source while stages copy
  the pages produced since the previous stage (destination pages reserved each stage);
  after a stage of <= `last_stage_pages` pages, or `max_stages` stages, the last stage
  copies the rest and the request resumes on the destination, all between two steps of
  the source: the request's downtime is that last stage alone;
- **hand-over** (DistServe): a prefilled request, paused on its prefill instance, is
  copied whole to a decode instance and resumes there.

A request not on the device (waiting, or swapped out) moves at once, without its KV: it
is computed again on the destination. A move is aborted cleanly, the request continuing
on the source, if the destination
cannot reserve pages, if the request finishes, is aborted or preempted on the source, or
if either instance dies; the destination's reservation is freed.

`MigrationPolicy` (Llumnix): every `interval_s`, pair the least free instance with the
most free one and migrate one running request from the first to the second when the
first is under pressure (requests waiting, or freeness under `low`), for load balance
and de-fragmentation (the head-of-line request's demand counts against freeness);
headroom kept for high-priority requests makes their instances look fuller, so normal
requests migrate away from them.
"""

from __future__ import annotations

import dataclasses
import math
import time

from mlx_sched.cluster.backends import gather
from mlx_sched.cluster.instance import Load


@dataclasses.dataclass
class Move:
    request_id: str
    src: int
    dst: int
    kind: str  # "migration" | "handover"
    preemptions: int  # the source's count when the move began: a preemption aborts it
    page_size: int
    chunk_pages: int = 16
    max_stages: int = 3
    last_stage_pages: int = 4
    started: float = 0.0
    stage: int = 0
    copied_tokens: int = 0  # positions whose pages are on the destination
    stage_next: int = 0  # the next page of the current stage to copy
    stage_end: int | None = None  # None: between stages
    stage_tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0  # spent in KV reads and writes
    downtime: float = 0.0
    outcome: str = ""  # "" while moving, then "done" or "aborted: <why>"
    # a modelled link (simulation): copies in flight until this time; the last stage's
    # copy is in flight (request paused on the source) when `finishing`
    ready_at: float = 0.0
    finishing: tuple[int, float] | None = None  # (computed, last stage start)

    def record(self) -> dict:
        return {
            "request_id": self.request_id,
            "kind": self.kind,
            "src": self.src,
            "dst": self.dst,
            "stages": self.stage,
            "tokens": self.copied_tokens,
            "bytes": self.bytes,
            "seconds": self.seconds,
            "downtime": self.downtime,
            "outcome": self.outcome,
        }


class Mover:
    """Advances moves over `instances`.

    Copies take the time they take (measured) unless `link_bytes_per_s` models the link (a
    simulated cluster): then a chunk of b bytes is in flight for b / link_bytes_per_s
    seconds of `clock` and the move waits for it, and a migration's last stage pauses the
    request on the source while its copy is in flight (its downtime)."""

    def __init__(
        self, instances, link_bytes_per_s: float | None = None, clock=None, on_reserved=None
    ):
        """`on_reserved(dst, pages)`: told of every reservation a destination granted (the
        cluster lowers that instance's free pages until its next report)."""
        if link_bytes_per_s is not None and (link_bytes_per_s <= 0 or clock is None):
            raise ValueError("a modelled link needs link_bytes_per_s > 0 and a clock")
        self.instances = instances
        self.link, self.clock = link_bytes_per_s, clock
        self.on_reserved = on_reserved

    def _pages(self, move: Move, tokens: int) -> int:
        return -(-tokens // move.page_size)

    def _progress(self, move: Move):
        """(status, computed) on the source, or a reason to abort."""
        (prog,) = gather([self.instances[move.src].call("progress", move.request_id)])
        if isinstance(prog, BaseException):
            return f"the source failed: {prog}"
        if prog is None:
            return "the request finished or left the source"
        status, computed, preemptions = prog
        if move.kind == "migration" and status in ("waiting", "swapped"):
            return status, 0  # not on the device: it moves without KV
        if preemptions != move.preemptions:
            return "the request was preempted on the source"
        want = "paused" if move.kind == "handover" or move.finishing else "running"
        if status != want:
            return f"the request is {status} on the source"
        return status, computed

    def _copy(self, move: Move, first: int, last: int) -> str | None:
        """Pages [first, last) from the source to the destination, in chunks."""
        src, dst = self.instances[move.src], self.instances[move.dst]
        for a in range(first, last, move.chunk_pages):
            b = min(last, a + move.chunk_pages)
            t0 = time.perf_counter()
            kv = src.call("read_kv", move.request_id, a, b)
            (n,) = gather([dst.call("write_kv", move.request_id, a, kv)])
            if isinstance(n, BaseException):
                return f"copying pages [{a}, {b}) failed: {n}"
            if self.link is None:
                move.seconds += time.perf_counter() - t0
            else:
                dt = n / self.link
                move.seconds += dt
                move.ready_at = max(move.ready_at, self.clock()) + dt
            move.bytes += n
        return None

    def _reserve(self, move: Move, pages: int) -> str | None:
        (ok,) = gather([self.instances[move.dst].call("reserve_import", move.request_id, pages)])
        if isinstance(ok, BaseException):
            return f"the destination failed: {ok}"
        if not ok:
            return f"the destination has no {pages} free pages"
        if self.on_reserved is not None:
            self.on_reserved(move.dst, pages)
        return None

    def advance(self, move: Move) -> str | None:
        """One cluster step of a move: a chunk of a stage, or the last stage. Returns an
        abort reason, or None (still moving, or done: `move.outcome == "done"`)."""
        if self.link is not None and move.ready_at > self.clock():
            return None  # a modelled copy still in flight
        prog = self._progress(move)
        if isinstance(prog, str):
            return prog
        status, computed = prog
        if move.finishing is not None:  # the modelled last stage has arrived
            return self._resume(move, *move.finishing)
        if status in ("waiting", "swapped"):  # recomputed on the destination
            if move.stage_end is not None or move.copied_tokens:
                return "the request was preempted on the source"
            return self._finish(move, 0, 0, 0)
        if move.stage_end is None:  # a new stage
            need = self._pages(move, computed)
            first = move.copied_tokens // move.page_size  # a partial page is copied again
            last_stage = move.kind == "handover" or (
                move.stage > 0
                and (need - first <= move.last_stage_pages or move.stage >= move.max_stages)
            )
            if last_stage and move.kind == "migration":
                return self._finish(move, computed, first, need)
            why = self._reserve(move, need)
            if why:
                return why
            move.stage_next, move.stage_end, move.stage_tokens = first, need, computed
        a = move.stage_next
        b = min(move.stage_end, a + move.chunk_pages)
        why = self._copy(move, a, b) if b > a else None
        if why:
            return why
        move.stage_next = b
        if b >= move.stage_end:
            move.stage += 1
            move.copied_tokens = move.stage_tokens
            move.stage_end = None
            if move.kind == "handover":
                return self._finish(move, computed, move.stage_next, move.stage_next)
        return None

    def _finish(self, move: Move, computed: int, first: int, need: int) -> str | None:
        """The last stage: copy the rest, resume on the destination, leave the source. Runs
        between two steps of the source, so the request computes nowhere meanwhile."""
        t0 = time.perf_counter() if self.link is None else self.clock()
        why = self._reserve(move, need) or self._copy(move, first, need)
        if why:
            return why
        if self.link is not None and move.ready_at > self.clock():
            if move.kind == "migration":
                (err,) = gather([self.instances[move.src].call("pause", move.request_id)])
                if isinstance(err, BaseException):
                    return f"the source failed: {err}"
            move.finishing = (computed, t0)
            return None
        return self._resume(move, computed, t0)

    def _resume(self, move: Move, computed: int, t0: float) -> str | None:
        """Hand the request to the destination and leave the source."""
        src, dst = self.instances[move.src], self.instances[move.dst]
        (state,) = gather([src.call("export_request", move.request_id)])
        if isinstance(state, BaseException):
            return f"the source failed: {state}"
        (err,) = gather([dst.call("import_request", state)])
        if isinstance(err, BaseException):
            return f"the destination refused the request: {err}"
        gather([src.call("detach", move.request_id)])  # a dead source: it lives on dst
        move.copied_tokens = computed
        move.stage += move.kind == "migration"
        move.downtime = (time.perf_counter() if self.link is None else self.clock()) - t0
        move.outcome = "done"
        return None

    def abort(self, move: Move, why: str) -> None:
        """Free the destination's reservation; a paused request resumes on the source."""
        move.outcome = f"aborted: {why}"
        gather([self.instances[move.dst].call("cancel_import", move.request_id)])
        if move.finishing is not None and move.kind == "migration":
            gather([self.instances[move.src].call("resume", move.request_id)])


@dataclasses.dataclass
class MigrationPolicy:
    """Llumnix's load-balancing migration: which request moves where, and when."""

    interval_s: float = 0.05
    low: float = 4.0  # pages per running sequence under which an instance sheds load
    headroom_pages: int = 0  # kept per high-priority request (priority > 0)
    max_moves: int = 1  # migrations in flight at once

    def source(self, loads: list[Load | None], busy: set[int]) -> int | None:
        """The least free instance not in `busy`: the one that would give a request."""
        live = [i for i, ld in enumerate(loads) if ld is not None and i not in busy]
        if not live:
            return None
        return min(live, key=lambda i: (loads[i].freeness(self.headroom_pages), i))

    def pick(
        self, loads: list[Load | None], busy: set[int], candidates
    ) -> tuple[int, int, str] | None:
        """(source, destination, request id) of the next migration, or None. `candidates(i)`
        lists instance i's movable running requests as (id, priority, pages, tokens)."""
        live = [i for i, ld in enumerate(loads) if ld is not None and i not in busy]
        if len(live) < 2:
            return None
        free = {i: loads[i].freeness(self.headroom_pages) for i in live}
        src = self.source(loads, busy)
        dst = max(live, key=lambda i: (free[i], loads[i].free_pages, -i))
        s = loads[src]
        pressed = s.waiting > 0 or free[src] < self.low
        if src == dst or not pressed or loads[dst].waiting > 0 or free[dst] <= free[src]:
            return None
        cands = [c for c in candidates(src) if c[1] <= 0 or self.headroom_pages == 0]
        if not cands or (len(cands) == 1 and s.running <= 1):
            return None
        rid, _, pages, _ = min(cands, key=lambda c: (c[2], c[0]))
        if pages >= loads[dst].free_pages:
            return None
        return src, dst, rid


def freeness_table(loads: list[Load | None], headroom: int = 0) -> list[float]:
    return [ld.freeness(headroom) if ld is not None else -math.inf for ld in loads]
