"""The policy interface, its registry, and the building blocks most policies share.

A policy subclasses `Policy`, sets `name`, registers itself with `@register`,
optionally declares its settings as a frozen dataclass `Args` (filled from
`ServeConfig.policy_args`, unknown keys are config errors), and implements
`schedule(sched, now) -> StepPlan` with the blocks below. Hooks (`on_arrival`,
`on_tokens`, `on_finish`, `on_step`) let it keep its own state. Every module
of this package is imported by `make_policy`, so a new policy is one new file.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.plan import StepPlan
from mlx_sched.serve.request import Request, Seq
from mlx_sched.serve.scheduler import Scheduler
from models.errors import ConfigError, check_keys

REGISTRY: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make a policy available to `make_policy` under `cls.name`."""
    if REGISTRY.get(cls.name, cls) is not cls:
        raise ValueError(f"two policies are named '{cls.name}'")
    REGISTRY[cls.name] = cls
    return cls


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

    @property
    def budget(self) -> int:
        """Tokens one step may compute (Sarathi-Serve's tau); the one place it is derived."""
        return self.cfg.token_budget

    def schedule(self, sched: Scheduler, now: float) -> StepPlan:
        raise NotImplementedError

    # hooks (no-ops by default)
    def on_arrival(self, req: Request, now: float) -> None: ...

    def on_tokens(self, req: Request, num_new: int, now: float) -> None: ...

    def on_finish(self, req: Request, now: float) -> None: ...

    def on_step(self, record) -> None: ...

    # -- shared building blocks ----------------------------------------------------

    def swap_in_all(self, sched: Scheduler, plan: StepPlan, order: list[Request]) -> None:
        """Bring swapped requests back in `order` while their pages fit."""
        for req in order:
            if req in sched.swapped and not sched.swap_in(req, plan):
                break

    def decode_positions(self, seq: Seq) -> int:
        """Positions a decoding sequence computes: its last token plus its drafts, trimmed to
        the widest compiled decode width."""
        del seq.draft[self.cfg.max_width - 1 :]
        return 1 + len(seq.draft)

    def schedule_decodes(
        self,
        sched: Scheduler,
        plan: StepPlan,
        order: list[Request],
        wants: Callable[[Seq], bool] | None = None,
    ) -> None:
        """A decode for every decoding sequence of `order` (up to max_seqs in all; only those
        `wants` accepts, if given); preempt from the tail of `order` when KV runs short. A
        sequence whose copy-on-write copy does not fit this step's copy allowance waits for
        the next step."""
        running = set(sched.running)  # kept as sched.running: only preempt() below leaves it
        max_seqs = self.cfg.max_seqs
        for req in list(order):
            if req not in running:
                continue  # preempted below while making room
            for seq in req.live_seqs:
                if len(seq.tokens) - seq.num_computed != 1 or plan.has(seq):
                    continue  # not decoding (remaining != 1), or already planned
                if wants is not None and not wants(seq):
                    continue
                if plan.num_decodes >= max_seqs:
                    return
                n = self.decode_positions(seq)
                while not sched.reserve(seq, n, plan):
                    if sched.cow_limited:
                        break
                    if n > 1:  # verify fewer drafts before preempting anyone
                        seq.draft.clear()
                        n = 1
                        continue
                    victim = next(r for r in reversed(order) if r in running)
                    sched.preempt(victim, plan)
                    running.discard(victim)
                    if victim is req:
                        break
                else:
                    plan.add(seq, n)
                if req not in running:
                    break

    def schedule_prefill(self, sched: Scheduler, plan: StepPlan, seq: Seq, budget: int) -> int:
        """Schedule up to `budget` of seq's uncomputed tokens as one chunk; returns tokens used."""
        if plan.num_prefills >= self.cfg.max_prefill_rows or budget <= 0 or plan.has(seq):
            return 0
        n = min(sched.max_chunk(seq), budget, self.cfg.chunk_tokens)
        if n <= 0 or not sched.reserve(seq, n, plan):
            return 0
        plan.add(seq, n)
        return n

    def schedule_partial_prefills(
        self, sched: Scheduler, plan: StepPlan, order: list[Request], budget: int
    ) -> int:
        """Continue in-flight prefills (recomputes too) of `order`; returns the budget left."""
        running = set(sched.running)  # nothing is preempted here
        for req in order:
            if req not in running:
                continue
            for seq in req.live_seqs:
                if len(seq.tokens) - seq.num_computed > 1:  # remaining > 1
                    budget -= self.schedule_prefill(sched, plan, seq, budget)
        return budget

    def serve_running(self, sched: Scheduler, plan: StepPlan, order: list[Request]) -> int:
        """The stall-free core of a step: a decode for every decoding sequence of `order`, then
        its in-flight prefills under the rest of the token budget; returns the budget left."""
        self.schedule_decodes(sched, plan, order)
        return self.schedule_partial_prefills(sched, plan, order, self.budget - plan.tokens)

    def max_resident(self) -> int:
        """Sequences that may hold KV on the device at once. Policies that run every resident
        sequence each step need this <= max_seqs (the largest batch); policies that let
        residents wait (MLFQ, slices) may keep more, bounded by pages."""
        return self.cfg.max_seqs

    def try_admit(self, sched: Scheduler, plan: StepPlan, req: Request, budget: int, now) -> int:
        """Admit `req` and schedule its first chunk; undo and return 0 if it does not fit.
        Slots are reserved for all n sequences of a parallel-sampling request up front."""
        need = sched.seqs_needed(req)
        if len(plan.work) + need > self.cfg.max_seqs:
            return 0
        if sched.num_running_seqs + need > self.max_resident():
            return 0
        if plan.num_prefills >= self.cfg.max_prefill_rows:
            return 0
        before = plan.tokens
        seqs = sched.admit(req, now)
        if sched.needs_fork(req):
            sched.fork(req)  # its n samples decode at once; out of pages, it waits (unadmitted)
            for seq in req.live_seqs:
                if plan.num_decodes >= self.cfg.max_seqs:
                    break
                if sched.reserve(seq, 1, plan):
                    plan.add(seq, 1)
                elif not sched.cow_limited:
                    break
        else:
            for seq in seqs:
                self.schedule_prefill(sched, plan, seq, budget - (plan.tokens - before))
        used = plan.tokens - before
        if used == 0 and req in sched.running:
            sched.unadmit(req)
        return used

    def waiting_head(self, sched: Scheduler, plan: StepPlan) -> list[Request]:
        """The waiting requests `admit_in_order` can reach this step, in arrival order: each
        admission adds an entry, so at most one past the free slots is looked at (a long
        queue is not copied every step)."""
        return list(itertools.islice(sched.waiting, max(0, self.cfg.max_seqs - len(plan.work)) + 1))

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
        """A plan of plain decodes runs as a slice of up to slice_len iterations per sequence
        (`cap` may lower a sequence's count); the reservation is extended if pages allow."""
        work = plan.work
        if not work or plan.num_prefills:
            return plan
        for _, n in work:
            if n > 1:
                return plan
        plan.as_slice = True
        S = self.cfg.slice_len
        for i, (seq, _) in enumerate(work):
            req = seq.request
            want = min(S, req.sampling.max_tokens - (len(seq.tokens) - len(req.prompt)))
            if cap is not None:
                want = max(1, min(want, cap(seq)))
            n = want
            while n > 1 and not sched.reserve(seq, n, plan):
                n //= 2
            work[i] = (seq, max(1, n))
        return plan
