"""Slice-level scheduling (SCLS): generation is cut into fixed slices of `slice_tokens`.

A batch is formed from the pool of unfinished requests (running or waiting,
oldest first) and runs for at most one slice: each member prefills if it must
and then decodes until it has produced `slice_tokens` tokens in this slice or
finished. Membership is fixed for the slice (no one joins mid-slice), which
bounds the slice's time and memory. The batcher adds requests while the
step-time model's estimate of the slice stays under `max_slice_s` (0: no
limit) and the KV pages the members need by the end of the slice fit. After
the slice, unfinished members return to the pool (keeping their KV while it
fits) and the next batch is formed.
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

    def _pages_needed(self, sched: Scheduler, req: Request) -> int:
        pool = sched.pool
        total = 0
        for s in req.seqs:
            end = min(
                len(s.tokens) + self.args.slice_tokens, s.prompt_len + req.sampling.max_tokens
            )
            total += pool.pages_for(end) - len(s.pages)
        return total * (req.sampling.n if len(req.seqs) == 1 else 1)

    def _form_batch(self, sched: Scheduler) -> None:
        self.batch, self.start_gen = [], {}
        budget_pages = sched.pool.num_available
        seqs = 0
        pool = sorted([*sched.running, *sched.swapped, *sched.waiting], key=lambda r: r.fcfs_key)
        for req in pool:
            need = self._pages_needed(sched, req)
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

    def schedule(self, sched: Scheduler, now: float) -> StepPlan:
        if all(self._member_done(r) for r in self.batch):
            self._form_batch(sched)
        members = [r for r in self.batch if not self._member_done(r)]
        plan = StepPlan()
        # members must be on the device; idle non-members give way if pages run short
        self.swap_in_all(sched, plan, [r for r in members if r in sched.swapped])
        on_device = [r for r in members if r in sched.running]
        decoding = [r for r in on_device if all(self._left_in_slice(s) > 0 for s in r.live_seqs)]
        self.schedule_decodes(sched, plan, decoding)
        budget = self.schedule_partial_prefills(sched, plan, on_device, self.budget - plan.tokens)
        self.admit_in_order(sched, plan, [r for r in members if r in sched.waiting], budget, now)
        if not plan.work and members:  # members blocked on pages held by idle requests
            idle = [r for r in sched.running if r not in self.batch]
            if idle:
                sched.preempt(idle[-1], plan)
        return self.finish_plan(sched, plan, cap=lambda s: max(1, self._left_in_slice(s)))
