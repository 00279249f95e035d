"""Sarathi-Serve: chunked prefill with piggybacked decodes under a stall-free token budget.

`variant="stall_free"` (the default) is the base policy's configuration made
explicit: every step first gives each running decode its token, then fills
the rest of `token_budget` with prefill chunks, so decodes never stall.
`variant="prefill_first"` is what stalls look like (vLLM v0's default): while
any prompt is waiting or partially prefilled, steps carry prefill chunks only
and every running decode waits; its inter-token gaps grow by whole prefills.
`token_budget` overrides the engine's budget for this policy (tau: ~512 for
strict, ~2048 for relaxed time-between-token SLOs).
"""

from __future__ import annotations

import dataclasses

from mlx_sched.serve.plan import StepPlan
from mlx_sched.serve.policies.base import Policy, register
from mlx_sched.serve.scheduler import Scheduler
from models.errors import ConfigError

VARIANTS = ("stall_free", "prefill_first")


@dataclasses.dataclass(frozen=True)
class SarathiArgs:
    variant: str = "stall_free"
    token_budget: int = 0  # 0: the engine's token_budget

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ConfigError(f"sarathi variant must be one of {VARIANTS}, got '{self.variant}'")
        if self.token_budget < 0:
            raise ConfigError(f"sarathi token_budget must be >= 0, got {self.token_budget}")


@register
class Sarathi(Policy):
    name = "sarathi"
    Args = SarathiArgs

    def __init__(self, cfg):
        super().__init__(cfg)
        if self.budget > cfg.token_budget:
            raise ConfigError(
                f"sarathi token_budget {self.budget} exceeds the engine's compiled budget "
                f"{cfg.token_budget}; raise serve.token_budget"
            )
        if self.budget < cfg.page_size:
            raise ConfigError(f"sarathi token_budget {self.budget} < page_size {cfg.page_size}")

    @property
    def budget(self) -> int:
        return self.args.token_budget or self.cfg.token_budget

    def schedule(self, sched: Scheduler, now: float) -> StepPlan:
        plan = StepPlan()
        self.swap_in_all(sched, plan, sorted(sched.swapped, key=lambda r: r.fcfs_key))
        running = list(sched.running)
        prefill_pending = bool(sched.waiting) or any(
            s.remaining > 1 for r in running for s in r.live_seqs
        )
        if self.args.variant == "stall_free" or not prefill_pending:
            budget = self.serve_running(sched, plan, running)
        else:
            budget = self.schedule_partial_prefills(sched, plan, running, self.budget)
        if not sched.swapped:
            self.admit_in_order(sched, plan, self.waiting_head(sched, plan), budget, now)
        if self.args.variant == "prefill_first" and not plan.num_prefills and prefill_pending:
            self.schedule_decodes(sched, plan, running)  # nothing admissible: don't idle
        return self.finish_plan(sched, plan)
