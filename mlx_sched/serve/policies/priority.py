"""Priority scheduling: priority classes, shortest-job-first with aging, TTFT deadlines.

Requests are ranked by a key (smaller runs first):

- `mode="class"`: higher `priority` first, then arrival;
- `mode="sjf"`: the shorter predicted job first (prompt_len * prefill_weight +
  max_tokens), minus `aging` times the seconds it has waited, so long jobs
  cannot starve;
- `mode="deadline"`: the least slack first, slack = TTFT deadline - now -
  estimated prefill time; requests without a deadline come after, by arrival.

Admission follows the rank. With `preempt=True`, a waiting request that
outranks a running one and cannot be admitted (no slot or no KV) preempts the
lowest-ranked running request. Preempted requests keep their place: the rank
depends on their arrival and attributes, not on when they were preempted.
"""

from __future__ import annotations

import dataclasses

from mlx_sched.serve.plan import StepPlan
from mlx_sched.serve.policies.base import Policy, register
from mlx_sched.serve.request import Request
from mlx_sched.serve.scheduler import Scheduler
from models.errors import ConfigError

MODES = ("class", "sjf", "deadline")


@dataclasses.dataclass(frozen=True)
class PriorityArgs:
    mode: str = "class"
    preempt: bool = True
    aging: float = 10.0  # sjf: predicted tokens forgiven per second of waiting
    prefill_weight: float = 0.1  # sjf: a prompt token costs this many output tokens

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"priority mode must be one of {MODES}, got '{self.mode}'")
        if self.aging < 0 or self.prefill_weight < 0:
            raise ConfigError("priority aging and prefill_weight must be >= 0")


@register
class Priority(Policy):
    name = "priority"
    Args = PriorityArgs

    def key(self, req: Request, now: float):
        a = self.args
        if a.mode == "class":
            return (-req.priority, *req.fcfs_key)
        if a.mode == "sjf":
            size = req.prompt_len * a.prefill_weight + req.sampling.max_tokens
            return (size - a.aging * (now - req.arrival), *req.fcfs_key)
        if req.deadline is None:
            return (float("inf"), *req.fcfs_key)
        slack = req.deadline - now - self.sched.cost.prefill_time(req.prompt_len)
        return (slack, *req.fcfs_key)

    def schedule(self, sched: Scheduler, now: float) -> StepPlan:
        plan = StepPlan()
        rank = lambda reqs: sorted(reqs, key=lambda r: self.key(r, now))
        self.swap_in_all(sched, plan, rank(sched.swapped))
        running = rank(sched.running)  # the tail is preempted first when KV runs short
        budget = self.serve_running(sched, plan, running)
        for req in rank(sched.waiting):
            if budget <= 0 or sched.swapped:
                break
            used = self.try_admit(sched, plan, req, budget, now)
            if used == 0 and self.args.preempt:
                used = self._preempt_for(sched, plan, req, budget, now)
            if used == 0:
                break
            budget -= used
        return self.finish_plan(sched, plan)

    def _preempt_for(self, sched: Scheduler, plan: StepPlan, req: Request, budget: int, now):
        """Preempt lower-ranked running requests (lowest first) until `req` is admitted."""
        mine = self.key(req, now)
        while True:
            victims = [r for r in sched.running if self.key(r, now) > mine]
            if not victims:
                return 0
            sched.preempt(max(victims, key=lambda r: self.key(r, now)), plan)
            used = self.try_admit(sched, plan, req, budget, now)
            if used:
                return used
