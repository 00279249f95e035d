"""Scheduler mechanisms: queues, page reservation, admission, forking, preemption, swap.

A *policy* (mlx_sched/serve/policies/) decides who runs; this module does what
a decision implies on the host: reserving KV pages (with copy-on-write),
prefix-cache lookups on admission, preemption by recompute or by swap, and
forking the sequences of a parallel-sampling request. It moves no KV itself:
the copies and transfers a decision needs are written into the `StepPlan`,
which the engine executes around the device step.
"""

from __future__ import annotations

import collections

from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.cost_model import StepTimeModel
from mlx_sched.serve.kv_store import HostKVStore
from mlx_sched.serve.paging import PagePool, hash_chain, page_hash
from mlx_sched.serve.plan import PageTransfer, StepPlan
from mlx_sched.serve.request import Request, RequestError, Seq, Status


class Scheduler:
    """Queues and mechanisms; `policy.schedule(self, now)` builds each step's plan."""

    def __init__(self, cfg: ServeConfig, pool: PagePool, store: HostKVStore | None = None):
        self.cfg, self.pool = cfg, pool
        self.store = store if store is not None else HostKVStore()
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.swapped: list[Request] = []
        self.paused: dict[str, Request] = {}  # holding their pages while they move elsewhere
        self.cost = StepTimeModel()  # step-time estimates for policies; the engine refits it

    # -- accounting ---------------------------------------------------------------

    @property
    def num_running_seqs(self) -> int:
        """Decode slots the running requests hold (a request that will fork holds n)."""
        n = 0
        for r in self.running:  # seqs_needed, inlined: this runs every step
            n += r.sampling.n if len(r.seqs) == 1 else len(r.live_seqs)
        return n

    def kv_occupancy(self) -> tuple[int, int]:
        """KV pages in use, and the tokens whose KV the running sequences hold in them (a page
        shared by several sequences counts once, as full as the fullest)."""
        Z, filled = self.cfg.page_size, {}
        for req in self.running:
            for s in req.live_seqs:
                pages, c = s.pages, s.num_computed
                full = min(len(pages), c // Z)
                filled.update(dict.fromkeys(pages[:full], Z))  # full pages: as full as can be
                if full < len(pages) and c - full * Z > filled.get(pages[full], 0):
                    filled[pages[full]] = c - full * Z  # the partly filled page; later ones: 0
        return self.pool.num_in_use, sum(filled.values())

    def check_fits(self, num_tokens: int, sampling) -> None:
        """A RequestError unless a request of `num_tokens` prompt tokens with `sampling` fits
        an idle engine (its pages, its sequences)."""
        need = self.pool.pages_for(num_tokens + sampling.max_tokens) * sampling.n
        if need > self.cfg.num_pages - 1:
            raise RequestError(
                f"request needs up to {need} KV pages but the pool has {self.cfg.num_pages - 1}; "
                "raise serve.num_pages or lower max_tokens / n"
            )
        if sampling.n > self.cfg.max_seqs:
            raise RequestError(f"n={sampling.n} exceeds serve.max_seqs={self.cfg.max_seqs}")

    def seqs_needed(self, req: Request) -> int:
        return req.sampling.n if len(req.seqs) == 1 else len(req.live_seqs)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    # -- pages --------------------------------------------------------------------

    def reserve(self, seq: Seq, num_tokens: int, plan: StepPlan) -> bool:
        """Back positions [num_computed, num_computed + num_tokens) with writable pages.

        Allocates missing pages and copies shared pages that would be written
        (copy-on-write; the copy's source is pinned until the step has run).
        All-or-nothing: returns False and changes nothing if the pool cannot cover
        it; `cow_limited` tells whether the step's copy allowance was the reason.
        """
        pool, pages = self.pool, seq.pages
        Z, start = pool.page_size, seq.num_computed
        first, last = start // Z, (start + num_tokens - 1) // Z
        have = len(pages)
        refcount = pool.refcount
        if last < have:  # no new page
            new = 0
            if first == last:  # one page (a decode, mostly): no list to build
                if refcount[pages[first]] <= 1:  # nor a copy: nothing to do
                    self.cow_limited = len(plan.copies) > self.cfg.max_copies
                    return not self.cow_limited
                shared = [first]
            else:
                shared = [i for i in range(first, last + 1) if refcount[pages[i]] > 1]
        else:
            new = last + 1 - have
            shared = [i for i in range(first, have) if refcount[pages[i]] > 1]
        self.cow_limited = False
        if new + len(shared) > pool.num_available:
            return False
        if len(plan.copies) + len(shared) > self.cfg.max_copies:
            self.cow_limited = True
            return False
        for i in shared:
            src = seq.pages[i]
            page, copy = self.pool.writable(src)
            self.pool.incref(src)  # the copy reads src during the step: keep it until then
            plan.pinned.append(src)
            seq.pages[i] = page
            plan.copies.append(copy)
        if new:
            seq.pages.extend(self.pool.allocate(new))
        return True

    def release(self, plan: StepPlan) -> None:
        """After the step ran: drop the plan's pins on copy sources."""
        if plan.pinned:
            self.pool.free(plan.pinned)
            plan.pinned.clear()

    def register_full_pages(self, seq: Seq) -> None:
        """Offer every full, computed page of `seq` to the prefix cache."""
        if not self.cfg.prefix_caching:
            return
        Z = self.pool.page_size
        full = min(seq.num_computed, len(seq.tokens)) // Z
        while len(seq.page_hashes) < full:
            i = len(seq.page_hashes)
            parent = seq.page_hashes[-1] if seq.page_hashes else None
            h = page_hash(parent, seq.tokens[i * Z : (i + 1) * Z], seq.request.sampling.adapter)
            seq.page_hashes.append(h)
            self.pool.register(seq.pages[i], h)

    def trim(self, seq: Seq) -> None:
        """Release pages past the computed positions (reserved for drafts that were not kept)."""
        keep = self.pool.pages_for(seq.num_computed)
        if len(seq.pages) > keep:
            self.pool.free(seq.pages[keep:])
            del seq.pages[keep:]

    def free_seq(self, seq: Seq) -> None:
        self.pool.free(seq.pages)
        seq.pages = []
        self.store.discard(seq.id)

    def _reset(self, seq: Seq) -> None:
        """Forget a sequence's KV: it will be computed again from its tokens."""
        self.free_seq(seq)
        seq.num_computed = seq.num_cached = 0
        seq.page_hashes = []

    # -- admission ------------------------------------------------------------------

    def admit(self, req: Request, now: float) -> list[Seq]:
        """Move a waiting request to running, reusing cached prefix pages; returns the
        sequences that must compute (a finished sample of a preempted request never does)."""
        self.waiting.remove(req)
        seqs = req.live_seqs
        for seq in seqs:
            if self.cfg.prefix_caching and not seq.pages:
                Z = self.pool.page_size
                # keep at least one token to compute: the last page is never a hit
                usable = (len(seq.tokens) - 1) // Z
                # KV depends on the adapter: the chain is keyed by its name (None: the base)
                hashes = hash_chain(seq.tokens[: usable * Z], Z, req.sampling.adapter)
                seq.pages = self.pool.lookup(hashes)
                seq.page_hashes = hashes[: len(seq.pages)]
                seq.num_computed = seq.num_cached = len(seq.pages) * Z
        req.status = Status.RUNNING
        if req.first_scheduled is None:
            req.first_scheduled = now
        self.running.append(req)
        return seqs

    def unadmit(self, req: Request) -> None:
        """Undo `admit` when its first chunk could not be scheduled."""
        self.running.remove(req)
        for s in req.live_seqs:
            self._reset(s)
        if req.sampling.n > 1 and all(s.num_generated == 0 for s in req.seqs):
            req.seqs = req.seqs[:1]  # forked at admission: fork again when admitted
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
        plan.drop_request(req)
        ids = {s.id for s in req.seqs}
        pending_in = {t.seq_id for t in plan.swap_in if t.seq_id in ids}
        plan.swap_in[:] = [t for t in plan.swap_in if t.seq_id not in pending_in]
        copied = dict((dst, src) for src, dst in plan.copies)  # dst -> src, pending this step
        owned = {p for s in req.seqs for p in s.pages}
        plan.copies[:] = [(src, dst) for src, dst in plan.copies if dst not in owned]
        if mode == "swap":
            for s in req.live_seqs:
                s.draft = []
                if s.id not in pending_in:  # swapped in this very step: its host copy stands
                    # a page whose copy-on-write copy is still pending holds nothing yet:
                    # read the copy's source instead (pinned, and reads run first)
                    n = self.pool.pages_for(s.num_computed)
                    pages = tuple(copied.get(p, p) for p in s.pages[:n])
                    self.store.expect(s.id, len(pages))
                    plan.swap_out.append(PageTransfer(s.id, pages))
                self.pool.free(s.pages)
                s.pages = []
            req.status = Status.SWAPPED
            self.swapped.append(req)
            return
        for s in req.live_seqs:
            s.draft = []
            self._reset(s)
        if req.sampling.n > 1 and all(s.num_generated == 0 for s in req.seqs):
            req.seqs = req.seqs[:1]  # nothing generated yet: fork again after the prompt
        # (forked sequences that generated tokens recompute their own tokens independently;
        # finished ones keep their output and compute nothing)
        req.status = Status.WAITING
        self.waiting.appendleft(req)

    def swapped_pages(self, req: Request) -> int:
        return sum(self.store.num_pages(s.id) for s in req.live_seqs)

    def swap_in(self, req: Request, plan: StepPlan) -> bool:
        """Plan bringing a swapped request's KV back into fresh pages; False if they don't fit."""
        if self.swapped_pages(req) > self.pool.num_available:
            return False
        for s in req.live_seqs:
            s.pages = self.pool.allocate(self.store.num_pages(s.id))
            plan.swap_in.append(PageTransfer(s.id, tuple(s.pages)))
        self.swapped.remove(req)
        req.status = Status.RUNNING
        self.running.append(req)
        return True
