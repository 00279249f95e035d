"""Static request-level batching (FasterTransformer-style), the second baseline.

A batch of up to `max_seqs` waiting requests is formed when the engine is
empty; no request joins until every member has finished, so short requests
wait for the longest one and new arrivals wait for the whole batch. Within
the batch, prefills are chunked under the token budget and decodes run as
slices, like everything else in the engine.
"""

from __future__ import annotations

from mlx_sched.serve.plan import StepPlan
from mlx_sched.serve.policies.base import Policy, register
from mlx_sched.serve.request import Request
from mlx_sched.serve.scheduler import Scheduler


@register
class Static(Policy):
    name = "static"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.batch: list[Request] = []

    def schedule(self, sched: Scheduler, now: float) -> StepPlan:
        plan = StepPlan()
        self.batch = [r for r in self.batch if not r.is_finished]
        if not self.batch and not sched.running and not sched.swapped:
            seqs = 0
            for req in sched.waiting:  # the next batch: whoever is waiting now, up to max_seqs
                if seqs + sched.seqs_needed(req) > self.cfg.max_seqs:
                    break
                self.batch.append(req)
                seqs += sched.seqs_needed(req)
        self.swap_in_all(sched, plan, sorted(sched.swapped, key=lambda r: r.fcfs_key))
        running = list(sched.running)
        budget = self.serve_running(sched, plan, running)
        members = [r for r in self.batch if r in sched.waiting]
        self.admit_in_order(sched, plan, members, budget, now)
        return self.finish_plan(sched, plan)
