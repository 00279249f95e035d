"""Scheduler mechanisms (queues, page reservation, admission, preemption, swap) and the plan.

A *policy* (mlx_sched/policies/) decides who runs; this module does what a
decision implies: reserving KV pages (with copy-on-write), prefix-cache
lookups on admission, preemption by recompute or by swap, forking the
sequences of a parallel-sampling request. Policies call these methods and
return a `StepPlan`.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

import numpy as np

from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.cost_model import StepTimeModel
from mlx_sched.serve.paging import PagePool, hash_chain, page_hash
from mlx_sched.serve.request import Request, Seq, Status


@dataclasses.dataclass
class StepPlan:
    decode: list[Seq] = dataclasses.field(default_factory=list)  # one token each (or a slice)
    prefill: list[tuple[Seq, int]] = dataclasses.field(default_factory=list)  # chunks
    slice_len: int = 1
    slice_steps: list[int] = dataclasses.field(default_factory=list)  # per decode seq
    copies: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    preempted: list[Request] = dataclasses.field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(n for _, n in self.prefill)


class Scheduler:
    """Queues and mechanisms; `policy.schedule(self)` builds each step's plan."""

    def __init__(
        self,
        cfg: ServeConfig,
        pool: PagePool,
        swap_out: Callable[[list[int]], tuple[np.ndarray, np.ndarray]] | None = None,
        swap_in: Callable[[list[int], np.ndarray, np.ndarray], None] | None = None,
    ):
        self.cfg, self.pool = cfg, pool
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.swapped: list[Request] = []
        self._swap_out, self._swap_in = swap_out, swap_in
        self._host_kv: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # id(seq) -> pages' KV
        self.cost = StepTimeModel()  # step-time estimates for policies; the engine refits it

    # -- accounting ---------------------------------------------------------------

    @property
    def num_running_seqs(self) -> int:
        return sum(len(r.live_seqs) for r in self.running)

    def seqs_needed(self, req: Request) -> int:
        return req.sampling.n if len(req.seqs) == 1 else len(req.live_seqs)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    # -- pages --------------------------------------------------------------------

    def reserve(self, seq: Seq, num_tokens: int, plan: StepPlan) -> bool:
        """Back positions [num_computed, num_computed + num_tokens) with writable pages.

        Allocates missing pages and copies shared pages that would be written
        (copy-on-write). All-or-nothing: returns False and changes nothing if the
        pool (or the step's copy allowance) cannot cover it.
        """
        Z = self.pool.page_size
        start, end = seq.num_computed, seq.num_computed + num_tokens
        first, last = start // Z, (end - 1) // Z
        new = max(0, last + 1 - len(seq.pages))
        shared = [
            i
            for i in range(first, min(last + 1, len(seq.pages)))
            if self.pool.refcount[seq.pages[i]] > 1
        ]
        if new + len(shared) > self.pool.num_available:
            return False
        if len(plan.copies) + len(shared) > self.cfg.max_copies:
            return False
        for i in shared:
            page, copy = self.pool.writable(seq.pages[i])
            seq.pages[i] = page
            plan.copies.append(copy)
        if new:
            seq.pages.extend(self.pool.allocate(new))
        return True

    def register_full_pages(self, seq: Seq) -> None:
        """Offer every full, computed page of `seq` to the prefix cache."""
        if not self.cfg.prefix_caching:
            return
        Z = self.pool.page_size
        full = min(seq.num_computed, len(seq.tokens)) // Z
        while len(seq.page_hashes) < full:
            i = len(seq.page_hashes)
            parent = seq.page_hashes[-1] if seq.page_hashes else None
            h = page_hash(parent, seq.tokens[i * Z : (i + 1) * Z])
            seq.page_hashes.append(h)
            self.pool.register(seq.pages[i], h)

    def free_seq(self, seq: Seq) -> None:
        self.pool.free(seq.pages)
        seq.pages = []
        self._host_kv.pop(id(seq), None)

    # -- admission ------------------------------------------------------------------

    def admit(self, req: Request, now: float) -> Seq:
        """Move the head-of-queue request to running; reuse cached prefix pages."""
        self.waiting.remove(req)
        seq = req.seqs[0]
        if self.cfg.prefix_caching and not seq.pages:
            Z = self.pool.page_size
            # keep at least one prompt token to compute: the last page is never a hit
            usable = (len(seq.tokens) - 1) // Z
            hashes = hash_chain(seq.tokens[: usable * Z], Z)
            seq.pages = self.pool.lookup(hashes)
            seq.page_hashes = hashes[: len(seq.pages)]
            seq.num_computed = seq.num_cached = len(seq.pages) * Z
        req.status = Status.RUNNING
        if req.first_scheduled is None:
            req.first_scheduled = now
        self.running.append(req)
        return seq

    def unadmit(self, req: Request) -> None:
        """Undo `admit` when its first chunk could not be scheduled."""
        self.running.remove(req)
        for s in req.seqs:
            self.free_seq(s)
            s.num_computed = s.num_cached = 0
            s.page_hashes = []
        req.status = Status.WAITING
        self.waiting.appendleft(req)

    def fork(self, req: Request) -> None:
        """Create sequences 1..n-1 sharing sequence 0's pages (copy-on-write later)."""
        seq0 = req.seqs[0]
        for j in range(1, req.sampling.n):
            for p in seq0.pages:
                self.pool.incref(p)
            req.seqs.append(
                Seq(
                    req,
                    j,
                    list(seq0.tokens),
                    list(seq0.pages),
                    seq0.num_computed,
                    seq0.num_cached,
                    list(seq0.page_hashes),
                )
            )

    def needs_fork(self, req: Request) -> bool:
        s = req.seqs[0]
        return req.sampling.n > 1 and len(req.seqs) == 1 and s.num_computed >= s.prompt_len - 1

    def max_chunk(self, seq: Seq) -> int:
        """Tokens seq may compute now: stop short of the last prompt token before a fork."""
        req = seq.request
        if req.sampling.n > 1 and len(req.seqs) == 1:
            return max(0, seq.prompt_len - 1 - seq.num_computed)
        return seq.remaining

    # -- preemption -------------------------------------------------------------------

    def preempt(self, req: Request, plan: StepPlan, mode: str | None = None) -> None:
        """Take a running request off the device: recompute later, or swap its KV to host."""
        mode = mode or self.cfg.preemption
        self.running.remove(req)
        req.preemptions += 1
        plan.preempted.append(req)
        # pages of this request already scheduled in the plan are dropped from it
        plan.decode[:] = [s for s in plan.decode if s.request is not req]
        plan.prefill[:] = [(s, n) for s, n in plan.prefill if s.request is not req]
        owned = {p for s in req.seqs for p in s.pages}
        plan.copies[:] = [(src, dst) for src, dst in plan.copies if dst not in owned]
        if mode == "swap" and self._swap_out is not None:
            for s in req.live_seqs:
                n_pages = self.pool.pages_for(s.num_computed)
                self._host_kv[id(s)] = self._swap_out(s.pages[:n_pages])
                self.pool.free(s.pages)
                s.pages = []
            req.status = Status.SWAPPED
            self.swapped.append(req)
            return
        for s in req.seqs:
            self.free_seq(s)
            s.num_computed = s.num_cached = 0
            s.page_hashes = []
        if req.sampling.n > 1 and all(s.num_generated == 0 for s in req.seqs):
            req.seqs = req.seqs[:1]  # nothing generated yet: fork again after the prompt
        # (forked sequences that generated tokens recompute their own tokens independently)
        req.status = Status.WAITING
        self.waiting.appendleft(req)

    def swapped_pages(self, req: Request) -> int:
        return sum(
            self._host_kv[id(s)][0].shape[1] for s in req.live_seqs if id(s) in self._host_kv
        )

    def swap_in(self, req: Request) -> bool:
        """Bring a swapped request's KV back into fresh pages; False if they don't fit."""
        seqs = req.live_seqs
        if self.swapped_pages(req) > self.pool.num_available:
            return False
        for s in seqs:
            k, v = self._host_kv.pop(id(s))
            s.pages = self.pool.allocate(k.shape[1])
            self._swap_in(s.pages, k, v)
        self.swapped.remove(req)
        req.status = Status.RUNNING
        self.running.append(req)
        return True
