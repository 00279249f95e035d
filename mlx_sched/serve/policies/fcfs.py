"""FCFS with Sarathi-Serve's token budget: ORCA iteration-level scheduling, stall-free.

Each step packs, in order: (1) one token for every running decode (preempting
the most recently admitted request when KV runs short), (2) in-flight partial
prefills, `min(remaining, budget left)` each, (3) new requests in arrival
order while KV, slots and budget allow. Swapped-out requests come back first.
With no prefill pending, decodes run as a slice of `slice_len` iterations.
"""

from __future__ import annotations

from mlx_sched.serve.plan import StepPlan
from mlx_sched.serve.policies.base import Policy, register
from mlx_sched.serve.scheduler import Scheduler


@register
class FCFS(Policy):
    name = "fcfs"

    def schedule(self, sched: Scheduler, now: float) -> StepPlan:
        plan = StepPlan()
        self.swap_in_all(sched, plan, sorted(sched.swapped, key=lambda r: r.fcfs_key))
        running = list(sched.running)
        budget = self.serve_running(sched, plan, running)
        if not sched.swapped:
            self.admit_in_order(sched, plan, self.waiting_head(sched, plan), budget, now)
        return self.finish_plan(sched, plan)
