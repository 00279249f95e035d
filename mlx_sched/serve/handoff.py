"""Moving a request between engines: its state as plain data, its KV pages, and the steps of
a hand-over. The engine mixes these in; `mlx_sched.cluster` drives them between steps.

    state = src.export_request(rid)                  # tokens, sampling, timestamps
    if dst.reserve_import(rid, pages):               # destination pages, all-or-nothing
        k, v = src.read_kv(rid, first, last)         # pages [first, last) to host memory
        dst.write_kv(rid, first, k, v)               # into the reserved pages
        dst.import_request(src.export_request(rid))  # RUNNING on dst with its computed KV
        src.detach(rid)                              # gone from src, its pages freed
    else:
        dst.cancel_import(rid)                       # a failed hand-over frees what it held

A request that must not compute on the source while its pages move (disaggregation:
prefilled, waiting for a decode instance) is `pause`d: out of the running queue, its
pages kept; `resume` puts it back. Only requests with one sequence (`n == 1`) move; the
KV read is of computed positions only, so a partially filled last page is read again by
the next stage (Llumnix's pipelined copy). Sampling keys depend on (seed, sequence,
position) only, so a moved request samples on the destination exactly what it would
have sampled on the source.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mlx_sched.serve.request import Request, RequestError, SamplingParams, Seq, Status


@dataclasses.dataclass
class RequestState:
    """A request as plain, picklable data: what another engine needs to continue it."""

    id: str
    prompt: list[int]
    sampling: SamplingParams
    arrival: float
    client: str
    priority: int
    deadline: float | None
    status: str  # Status.value on the source ("waiting", "running", "swapped", ...)
    tokens: list[int]  # prompt + generated
    num_computed: int  # positions whose KV the source holds (0 unless running or paused)
    token_times: list[float]
    logprobs: list[float]
    first_scheduled: float | None
    preemptions: int
    paused: bool = False

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - len(self.prompt)


class Handoff:
    """Engine methods for hand-overs (mixed into `Engine`; uses its scheduler, pool and
    runner). Every method is called between steps."""

    # -- the source side ---------------------------------------------------------------

    def _live(self, request_id: str) -> Request:
        req = self.requests.get(request_id)
        if req is None or req.is_finished:
            state = "unknown" if req is None else req.status.value
            raise RequestError(f"request '{request_id}' is {state}: it cannot move")
        return req

    def movable(self, request_id: str) -> str | None:
        """Why `request_id` cannot move to another engine now, or None if it can."""
        req = self.requests.get(request_id)
        if req is None or req.is_finished:
            return "unknown or finished"
        if req.sampling.n != 1:
            return f"it samples n={req.sampling.n} sequences (only n=1 requests move)"
        if self.spec is not None and self.spec.cfg.kind == "draft_model":
            return "a draft model's KV does not move with it"
        if req.sampling.adapter is not None:
            return f"it runs LoRA adapter '{req.sampling.adapter}' (adapters do not move)"
        return None

    def export_request(self, request_id: str) -> RequestState:
        """The request's state as plain data (it stays here)."""
        req = self._live(request_id)
        why = self.movable(request_id)
        if why is not None:
            raise RequestError(f"request '{request_id}' cannot move: {why}")
        (seq,) = req.seqs
        on_device = req.status is Status.RUNNING or request_id in self.sched.paused
        return RequestState(
            id=req.id,
            prompt=list(req.prompt),
            sampling=req.sampling,
            arrival=req.arrival,
            client=req.client,
            priority=req.priority,
            deadline=req.deadline,
            status=req.status.value,
            tokens=list(seq.tokens),
            num_computed=seq.num_computed if on_device else 0,
            token_times=list(seq.token_times),
            logprobs=list(seq.logprobs),
            first_scheduled=req.first_scheduled,
            preemptions=req.preemptions,
            paused=request_id in self.sched.paused,
        )

    def kv_pages(self, request_id: str) -> int:
        """Pages holding the request's computed positions (0 unless it is on the device)."""
        req = self._live(request_id)
        if req.status is not Status.RUNNING:
            return 0
        return self.pool.pages_for(req.seqs[0].num_computed)

    def read_kv(self, request_id: str, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
        """Host copies [N, last - first, Z, K, X] of the request's pages [first, last)."""
        req = self._live(request_id)
        pages = req.seqs[0].pages
        if req.status is not Status.RUNNING or not 0 <= first < last <= len(pages):
            raise RequestError(
                f"request '{request_id}' ({req.status.value}) holds {len(pages)} pages; "
                f"pages [{first}, {last}) cannot be read"
            )
        return self.runner.read_pages(pages[first:last])

    def pause(self, request_id: str) -> None:
        """Stop computing a running request, keeping its pages (it waits to move)."""
        req = self._live(request_id)
        if req.status is not Status.RUNNING or request_id in self.sched.paused:
            raise RequestError(f"request '{request_id}' is not running: it cannot be paused")
        self.sched.running.remove(req)
        self.sched.paused[request_id] = req
        for s in req.seqs:
            s.draft = []

    def resume(self, request_id: str) -> None:
        """Undo `pause`: the request computes here again."""
        req = self.sched.paused.pop(request_id, None)
        if req is None:
            raise RequestError(f"request '{request_id}' is not paused")
        self.sched.running.append(req)

    def detach(self, request_id: str) -> RequestState:
        """The request leaves this engine (it lives on elsewhere): its pages are freed, the
        policy forgets it, and it is not counted as finished or aborted here."""
        state = self.export_request(request_id)
        req = self.requests.pop(request_id)
        self.sched.paused.pop(request_id, None)
        for queue in (self.sched.waiting, self.sched.running, self.sched.swapped):
            if req in queue:
                queue.remove(req)
        for s in req.seqs:
            self.sched.free_seq(s)
        self._stops.pop(request_id, None)
        self._callbacks.pop(request_id, None)
        self.policy.on_finish(req, self.clock())
        if self.spec is not None:
            self.spec.forget(req)
        return state

    # -- the destination side ------------------------------------------------------------

    def reserve_import(self, request_id: str, num_pages: int) -> bool:
        """Hold `num_pages` free pages (in all, growing an earlier reservation) for a request
        that will move here; False, changing nothing, if the pool cannot."""
        if request_id in self.requests:
            raise RequestError(f"request id '{request_id}' is already in use here")
        held = self._imports.setdefault(request_id, [])
        more = num_pages - len(held)
        if more > self.pool.num_available:
            if not held:
                del self._imports[request_id]
            return False
        if more > 0:
            held.extend(self.pool.allocate(more))
        return True

    def reserved_pages(self, request_id: str) -> int:
        return len(self._imports.get(request_id, ()))

    def write_kv(self, request_id: str, first: int, k: np.ndarray, v: np.ndarray) -> None:
        """Write host copies into reserved pages [first, first + k.shape[1])."""
        held = self._imports.get(request_id, [])
        n = k.shape[1]
        if first < 0 or first + n > len(held):
            raise RequestError(
                f"request '{request_id}' has {len(held)} reserved pages here; pages "
                f"[{first}, {first + n}) cannot be written"
            )
        self.runner.write_pages(held[first : first + n], k, v)

    def cancel_import(self, request_id: str) -> None:
        """Free a reservation (an aborted hand-over); no-op without one."""
        self.pool.free(self._imports.pop(request_id, []))

    def import_request(self, state: RequestState) -> str:
        """Continue a request here from its state and the KV written into its reservation: it
        runs with `state.num_computed` positions computed (0: it is recomputed, as if
        preempted). Unused reserved pages are freed."""
        rid = state.id
        if rid in self.requests:
            raise RequestError(f"request id '{rid}' is already in use here")
        held = self._imports.pop(rid, [])
        need = self.pool.pages_for(state.num_computed)
        if need > len(held):
            self.pool.free(held)
            raise RequestError(
                f"request '{rid}' has {state.num_computed} computed positions ({need} pages) "
                f"but {len(held)} pages were reserved and written here"
            )
        self.pool.free(held[need:])
        req = Request(
            rid,
            list(state.prompt),
            state.sampling,
            state.arrival,
            state.client,
            state.priority,
            state.deadline,
            next(self._order),
            first_scheduled=state.first_scheduled,
            preemptions=state.preemptions,
        )
        req.seqs = [
            Seq(
                req,
                0,
                list(state.tokens),
                held[:need],
                state.num_computed,
                token_times=list(state.token_times),
                logprobs=list(state.logprobs),
            )
        ]
        self.requests[rid] = req
        if need:
            req.status = Status.RUNNING
            self.sched.running.append(req)
            self.sched.register_full_pages(req.seqs[0])
        else:
            self.sched.waiting.append(req)
        self.policy.on_arrival(req, state.arrival)
        return rid
