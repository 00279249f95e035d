"""FCFS with Sarathi-Serve's token budget: ORCA iteration-level scheduling, stall-free.

Each step packs, in order: (1) one token for every running decode (preempting
the most recently admitted request when KV runs short), (2) in-flight partial
prefills, `min(remaining, budget left)` each, (3) new requests in arrival
order while KV, slots and budget allow. Swapped-out requests come back first.
With no prefill pending, decodes run as a slice of `slice_len` iterations.
"""

from __future__ import annotations

from mlx_sched.policies.base import Policy
from mlx_sched.scheduler import Scheduler, StepPlan


class FCFS(Policy):
    name = "fcfs"

    def schedule(self, sched: Scheduler, now: float) -> StepPlan:
        plan = StepPlan()
        for req in sorted(sched.swapped, key=lambda r: r.arrival):
            if not sched.swap_in(req):
                break
        self.schedule_decodes(sched, plan, list(sched.running))
        budget = self.cfg.token_budget - len(plan.decode)
        for req in list(sched.running):
            for seq in req.live_seqs:
                if seq.remaining > 1 and seq not in (s for s, _ in plan.prefill):
                    budget -= self.schedule_prefill(sched, plan, seq, budget)
        while sched.waiting and budget > 0 and not sched.swapped:
            used = self.try_admit(sched, plan, sched.waiting[0], budget, now)
            if used == 0:
                break
            budget -= used
        return self.finish_plan(sched, plan)
