"""Slice-level scheduling (SCLS): generation is cut into fixed slices of `slice_tokens`.

A batch is formed from the pool of unfinished requests (running or waiting,
oldest first) and runs for at most one slice: each member prefills if it must
and then decodes until it has produced `slice_tokens` tokens in this slice or
finished. Membership is fixed for the slice (no one joins mid-slice), which
bounds the slice's time and memory. The batcher adds requests while the
step-time model's estimate of the slice stays under `max_slice_s` (0: no
limit) and the KV pages the members need by the end of the slice fit, counting
the pages idle residents hold. After the slice, unfinished members return to
the pool keeping their KV while it fits: when the members need the pages, idle
residents are preempted (by the configured mode), the most recent first.
"""

from __future__ import annotations

import dataclasses

from mlx_sched.serve.plan import StepPlan
from mlx_sched.serve.policies.base import Policy, register
from mlx_sched.serve.request import Request, Seq
from mlx_sched.serve.scheduler import Scheduler
from models.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SliceArgs:
    slice_tokens: int = 64
    max_slice_s: float = 0.0

    def __post_init__(self):
        if self.slice_tokens < 1:
            raise ConfigError(f"slice slice_tokens must be >= 1, got {self.slice_tokens}")
        if self.max_slice_s < 0:
            raise ConfigError(f"slice max_slice_s must be >= 0, got {self.max_slice_s}")


@register
class SliceLevel(Policy):
    name = "slice"
    Args = SliceArgs

    def __init__(self, cfg):
        super().__init__(cfg)
        self.batch: list[Request] = []
        self.start_gen: dict[str, int] = {}  # seq id -> tokens generated when the slice began
        self.slices = 0

    def _left_in_slice(self, seq: Seq) -> int:
        start = self.start_gen.setdefault(seq.id, seq.num_generated)
        return self.args.slice_tokens - (seq.num_generated - start)

    def _member_done(self, req: Request) -> bool:
        return req.is_finished or all(self._left_in_slice(s) <= 0 for s in req.live_seqs)

    def _estimate(self, sched: Scheduler, members: list[Request]) -> float:
        c = sched.cost
        n = sum(sched.seqs_needed(r) for r in members)
        ctx = sum(len(s.tokens) for r in members for s in r.seqs)
        prefill = sum(s.remaining for r in members for s in r.seqs if s.remaining > 1)
        return c.step_time(prefill_tokens=prefill) + self.args.slice_tokens * c.decode_time(n, ctx)

    def _pages_needed(self, sched: Scheduler, req: Request, fresh: bool) -> int:
        """Pages req still needs by the end of its slice (`fresh`: a slice that starts now)."""
        pool = sched.pool
        total = 0
        for s in req.seqs:
            ahead = self.args.slice_tokens if fresh else max(0, self._left_in_slice(s))
            end = min(len(s.tokens) + ahead, s.prompt_len + req.sampling.max_tokens)
            total += max(0, pool.pages_for(end) - len(s.pages))
        return total * (req.sampling.n if len(req.seqs) == 1 else 1)

    def _form_batch(self, sched: Scheduler) -> None:
        self.batch, self.start_gen = [], {}
        # a resident that joins keeps its pages; one that does not gives them up if needed
        held = {r.id: sum(len(s.pages) for s in r.seqs) for r in sched.running}
        budget_pages = sched.pool.num_available + sum(held.values())
        seqs = 0
        pool = sorted([*sched.running, *sched.swapped, *sched.waiting], key=lambda r: r.fcfs_key)
        for req in pool:
            need = self._pages_needed(sched, req, fresh=True) + held.get(req.id, 0)
            if seqs + sched.seqs_needed(req) > self.cfg.max_seqs or need > budget_pages:
                continue
            if (
                self.batch
                and self.args.max_slice_s
                and (self._estimate(sched, [*self.batch, req]) > self.args.max_slice_s)
            ):
                continue
            self.batch.append(req)
            budget_pages -= need
            seqs += sched.seqs_needed(req)
        if not self.batch and pool:  # nothing fits the estimates: run the oldest alone
            self.batch = pool[:1]
        self.slices += 1

    def max_resident(self) -> int:
        return 4 * self.cfg.max_seqs  # waiting residents keep their KV (bounded by pages)

    def _make_room(self, sched: Scheduler, plan: StepPlan, members: list[Request]) -> None:
        """Preempt idle residents, the most recent first, until the members' pages for the
        rest of their slice and the waiting members' slots fit (or none is left)."""
        idle = sorted((r for r in sched.running if r not in members), key=lambda r: r.fcfs_key)
        if not idle:
            return
        pages = sum(self._pages_needed(sched, r, fresh=False) for r in members)
        slots = sum(sched.seqs_needed(r) for r in members if r in sched.waiting)
        while idle and (
            pages > sched.pool.num_available or sched.num_running_seqs + slots > self.max_resident()
        ):
            sched.preempt(idle.pop(), plan)

    def schedule(self, sched: Scheduler, now: float) -> StepPlan:
        if all(self._member_done(r) for r in self.batch):
            self._form_batch(sched)
        members = [r for r in self.batch if not self._member_done(r)]
        plan = StepPlan()
        # members must be on the device: idle residents give way when pages or slots run short
        self._make_room(sched, plan, members)
        self.swap_in_all(sched, plan, [r for r in members if r in sched.swapped])
        on_device = [r for r in members if r in sched.running]
        # the samples of a parallel request can fall out of step (a slice shrunk to fit the
        # pages, a copy-on-write deferred): each decodes until its own share is done
        decoding = [r for r in on_device if any(self._left_in_slice(s) > 0 for s in r.live_seqs)]
        self.schedule_decodes(sched, plan, decoding, wants=lambda s: self._left_in_slice(s) > 0)
        budget = self.schedule_partial_prefills(sched, plan, on_device, self.budget - plan.tokens)
        self.admit_in_order(sched, plan, [r for r in members if r in sched.waiting], budget, now)
        for s in (s for r in members for s in r.live_seqs):  # forked or recomputing ones too:
            self._left_in_slice(s)  # their share counts from before their first token
        return self.finish_plan(sched, plan, cap=lambda s: max(1, self._left_in_slice(s)))
