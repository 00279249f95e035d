"""FastServe: skip-join multi-level feedback queue with token-level preemption.

Queue i has quantum `q0 * 2^i`. A new request skips the levels whose quantum
is shorter than its estimated prefill time (it joins the smallest i with
`q0 * 2^i >= T_prefill(prompt)`). Every step the batch is filled from the
highest non-empty levels, FCFS within a level; a running request that is not
picked this step keeps its KV and simply waits (token-level preemption).
After each step, a request whose time at its level exceeds the quantum moves
down one level (its timer restarts); one that stays returns to the front of
its level. Every `promote_every` steps, requests that have waited at least
`starve_s` seconds are promoted to the top level (0 turns this off).

KV: at least `min_free_pages` pages are kept free by proactively swapping out
idle requests from the tail of the lowest level (with preemption="swap"; else
they are preempted for recompute); a swapped request comes back as soon as it
is among the highest-ranked, making room the same way. The step never idles
while requests are resident.
"""

from __future__ import annotations

import dataclasses

from mlx_sched.serve.plan import StepPlan
from mlx_sched.serve.policies.base import Policy, register
from mlx_sched.serve.request import Request
from mlx_sched.serve.scheduler import Scheduler
from models.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class MLFQArgs:
    q0: float = 0.01  # seconds: quantum of the top level
    levels: int = 8
    promote_every: int = 1000  # steps between starvation checks (0: never promote)
    starve_s: float = 3.0
    min_free_pages: int = 0  # 0: max_seqs pages (one new page per decoding sequence)

    def __post_init__(self):
        if self.q0 <= 0 or self.levels < 1 or self.starve_s <= 0:
            raise ConfigError("mlfq needs q0 > 0, levels >= 1, starve_s > 0")
        if self.promote_every < 0 or self.min_free_pages < 0:
            raise ConfigError("mlfq promote_every and min_free_pages must be >= 0")


@dataclasses.dataclass
class _State:
    level: int
    attained: float = 0.0  # seconds run at this level
    last_run: float = 0.0  # when it last computed (or arrived)
    ticket: int = 0  # position within its level (smaller = nearer the front)


@register
class MLFQ(Policy):
    name = "mlfq"
    Args = MLFQArgs

    def __init__(self, cfg):
        super().__init__(cfg)
        self.state: dict[str, _State] = {}
        self.steps = 0
        self._tickets = 0
        self._last_ran: list[Request] = []

    def quantum(self, level: int) -> float:
        return self.args.q0 * 2**level

    def _ticket(self, front: bool = False) -> int:
        self._tickets += 1
        return -self._tickets if front else self._tickets

    # -- hooks ----------------------------------------------------------------------

    def on_arrival(self, req: Request, now: float) -> None:
        t_prefill = self.sched.cost.prefill_time(req.prompt_len)
        level = 0
        while level < self.args.levels - 1 and self.quantum(level) < t_prefill:
            level += 1  # skip-join
        self.state[req.id] = _State(level, 0.0, now, self._ticket())

    def on_finish(self, req: Request, now: float) -> None:
        self.state.pop(req.id, None)

    def on_step(self, record) -> None:
        """Charge the step's time to every request that ran; demote past the quantum."""
        for req in self._last_ran:
            st = self.state.get(req.id)
            if st is None:
                continue
            st.attained += record.device_s
            st.last_run = record.t
            if st.attained > self.quantum(st.level) and st.level < self.args.levels - 1:
                st.level, st.attained, st.ticket = st.level + 1, 0.0, self._ticket()
            else:
                st.ticket = self._ticket(front=True)  # unfinished: back to the front

    # -- scheduling -------------------------------------------------------------------

    def _key(self, req: Request):
        st = self.state[req.id]
        return (st.level, st.ticket)

    def _promote_starved(self, sched: Scheduler, now: float) -> None:
        for req in [*sched.waiting, *sched.running, *sched.swapped]:
            st = self.state[req.id]
            if st.level > 0 and now - st.last_run >= self.args.starve_s:
                st.level, st.attained, st.ticket = 0, 0.0, self._ticket()

    def max_resident(self) -> int:
        return 4 * self.cfg.max_seqs  # waiting residents keep their KV (bounded by pages)

    def schedule(self, sched: Scheduler, now: float) -> StepPlan:
        self.steps += 1
        if self.args.promote_every and self.steps % self.args.promote_every == 0:
            self._promote_starved(sched, now)
        plan = StepPlan()
        candidates = sorted([*sched.running, *sched.waiting, *sched.swapped], key=self._key)
        picked: list[Request] = []
        seqs = 0
        for req in candidates:
            if seqs + sched.seqs_needed(req) <= self.cfg.max_seqs:
                picked.append(req)
                seqs += sched.seqs_needed(req)
        self._make_room(sched, plan, picked)
        self.swap_in_all(sched, plan, [r for r in picked if r in sched.swapped])
        on_device = [r for r in picked if r in sched.running]
        if not on_device and not any(r in sched.waiting for r in picked):
            on_device = sorted(sched.running, key=self._key)  # never idle: run the best residents
        budget = self.serve_running(sched, plan, on_device)
        self.admit_in_order(sched, plan, [r for r in picked if r in sched.waiting], budget, now)
        if not plan.work and sched.running:
            self.serve_running(sched, plan, sorted(sched.running, key=self._key))
        self._last_ran = plan.requests()
        return self.finish_plan(sched, plan)

    def _make_room(self, sched: Scheduler, plan: StepPlan, picked: list[Request]) -> None:
        """Swap out (or preempt) the lowest-level idle residents until `min_free_pages` are free,
        the picked swapped requests' pages fit, and picked newcomers fit the resident limit."""
        pool = sched.pool
        want_pages = self.args.min_free_pages or self.cfg.max_seqs
        want_pages += sum(sched.swapped_pages(r) for r in picked if r in sched.swapped)
        newcomers = sum(sched.seqs_needed(r) for r in picked if r not in sched.running)
        idle = sorted((r for r in sched.running if r not in picked), key=self._key, reverse=True)
        for req in idle:
            short_slots = sched.num_running_seqs + newcomers > self.max_resident()
            if pool.num_available >= want_pages and not short_slots:
                break
            sched.preempt(req, plan)
