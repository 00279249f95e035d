"""The policy interface and the building blocks most policies share.

A policy subclasses `Policy`, sets `name`, optionally declares its settings as a
frozen dataclass `Args` (filled from `ServeConfig.policy_args`, unknown keys are
config errors), and implements `schedule(sched, now) -> StepPlan` with the
blocks below. Hooks (`on_arrival`, `on_tokens`, `on_finish`, `on_step`) let it
keep its own state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.request import Request, Seq
from mlx_sched.serve.scheduler import Scheduler, StepPlan
from models.errors import ConfigError, check_keys


@dataclasses.dataclass(frozen=True)
class NoArgs:
    pass


class Policy:
    """Decides each step who computes how many tokens."""

    name = "base"
    Args: type = NoArgs

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        check_keys(self.Args, cfg.policy_args, f"policy_args of policy '{self.name}'")
        try:
            self.args = self.Args(**cfg.policy_args)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"policy_args of policy '{self.name}': {e}") from e

    def bind(self, sched: Scheduler) -> None:
        """Called once by the engine: the scheduler whose queues and cost model we use."""
        self.sched = sched

    def schedule(self, sched: Scheduler, now: float) -> StepPlan:
        raise NotImplementedError

    # hooks (no-ops by default)
    def on_arrival(self, req: Request, now: float) -> None: ...

    def on_tokens(self, req: Request, num_new: int, now: float) -> None: ...

    def on_finish(self, req: Request, now: float) -> None: ...

    def on_step(self, record) -> None: ...

    # -- shared building blocks ----------------------------------------------------

    def swap_in_all(self, sched: Scheduler, order: list[Request]) -> None:
        """Bring swapped requests back in `order` while their pages fit."""
        for req in order:
            if req in sched.swapped and not sched.swap_in(req):
                break

    def schedule_decodes(self, sched: Scheduler, plan: StepPlan, order: list[Request]) -> None:
        """One token for every decoding sequence of `order`; preempt from the tail when short."""
        for req in list(order):
            if req not in sched.running:
                continue  # preempted below while making room
            for seq in req.live_seqs:
                if seq.remaining != 1:
                    continue
                while not sched.reserve(seq, 1, plan):
                    victim = next(r for r in reversed(order) if r in sched.running)
                    sched.preempt(victim, plan)
                    if victim is req:
                        break
                if req not in sched.running:
                    break
                plan.decode.append(seq)

    def schedule_prefill(self, sched: Scheduler, plan: StepPlan, seq: Seq, budget: int) -> int:
        """Schedule up to `budget` of seq's uncomputed tokens as one chunk; returns tokens used."""
        if len(plan.prefill) >= self.cfg.max_prefill_rows or budget <= 0:
            return 0
        n = min(sched.max_chunk(seq), budget, self.cfg.prefill_chunk)
        if n <= 0 or not sched.reserve(seq, n, plan):
            return 0
        plan.prefill.append((seq, n))
        return n

    def schedule_partial_prefills(
        self, sched: Scheduler, plan: StepPlan, order: list[Request], budget: int
    ) -> int:
        """Continue in-flight prefills (recomputes too) of `order`; returns the budget left."""
        planned = {id(s) for s, _ in plan.prefill}
        for req in order:
            if req not in sched.running:
                continue
            for seq in req.live_seqs:
                if seq.remaining > 1 and id(seq) not in planned:
                    budget -= self.schedule_prefill(sched, plan, seq, budget)
        return budget

    def serve_running(self, sched: Scheduler, plan: StepPlan, order: list[Request]) -> int:
        """The stall-free core of a step: a token for every decode of `order`, then its in-flight
        prefills under the rest of the token budget; returns the budget left."""
        self.schedule_decodes(sched, plan, order)
        budget = self.cfg.token_budget - len(plan.decode)
        return self.schedule_partial_prefills(sched, plan, order, budget)

    def max_resident(self) -> int:
        """Sequences that may hold KV on the device at once. Policies that run every resident
        sequence each step need this <= max_seqs (the largest batch); policies that let
        residents wait (MLFQ, slices) may keep more, bounded by pages."""
        return self.cfg.max_seqs

    def try_admit(self, sched: Scheduler, plan: StepPlan, req: Request, budget: int, now) -> int:
        """Admit `req` and schedule its first chunk; undo and return 0 if it does not fit."""
        need = sched.seqs_needed(req)
        in_plan = len(plan.decode) + len(plan.prefill)
        if in_plan + need > self.cfg.max_seqs:
            return 0
        if sched.num_running_seqs + need > self.max_resident():
            return 0
        if len(plan.prefill) >= self.cfg.max_prefill_rows:
            return 0
        seq = sched.admit(req, now)
        if sched.needs_fork(req):
            sched.fork(req)
            self.schedule_decodes(sched, plan, [req])
            return len(req.seqs) if req in sched.running else 0
        used = self.schedule_prefill(sched, plan, seq, budget)
        if used == 0:
            sched.unadmit(req)
        return used

    def admit_in_order(self, sched, plan, order: list[Request], budget: int, now) -> int:
        """Admit waiting requests in `order` until one does not fit; returns the budget left."""
        for req in order:
            if budget <= 0 or req not in sched.waiting:
                break
            used = self.try_admit(sched, plan, req, budget, now)
            if used == 0:
                break
            budget -= used
        return budget

    def finish_plan(
        self, sched: Scheduler, plan: StepPlan, cap: Callable[[Seq], int] | None = None
    ) -> StepPlan:
        """Decode-only plans run as a slice of up to slice_len iterations (per-seq `cap`)."""
        if plan.prefill or not plan.decode or self.cfg.slice_len == 1:
            plan.slice_steps = [1] * len(plan.decode)
            return plan
        S = self.cfg.slice_len
        steps = []
        for seq in plan.decode:
            want = min(S, seq.request.sampling.max_tokens - seq.num_generated)
            if cap is not None:
                want = max(1, min(want, cap(seq)))
            n = want  # extend the one-token reservation to the whole slice if pages allow
            while n > 1 and not sched.reserve(seq, n, plan):
                n //= 2
            steps.append(max(1, n))
        plan.slice_len, plan.slice_steps = S, steps
        return plan
