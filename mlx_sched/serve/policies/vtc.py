"""VTC: fair serving with Virtual Token Counters (Sheng et al.).

Each client u has a counter c_u of the service it received, divided by its
weight: `c_u += w_in * n_in` when a request is admitted and `c_u += w_out`
per generated token (linear cost, w_in = 1, w_out = 2), or the step-time
model's prefill and decode seconds (profiled cost). When a client goes from
no queued request to backlogged, its counter is lifted to the smallest
counter among the other backlogged clients, so idling earns no credit.
Admission repeatedly takes the backlogged client with the smallest counter
and admits its oldest request if KV (with its max_tokens reserved) and the
step's prefill budget allow; it stops at the first that does not fit.
Running decodes are never held back. The service difference between
backlogged clients stays bounded, where FCFS lets it grow without bound.
"""

from __future__ import annotations

import dataclasses

from mlx_sched.serve.plan import StepPlan
from mlx_sched.serve.policies.base import Policy, register
from mlx_sched.serve.request import Request
from mlx_sched.serve.scheduler import Scheduler
from models.errors import ConfigError

COSTS = ("linear", "profiled")


@dataclasses.dataclass(frozen=True)
class VTCArgs:
    weights: dict = dataclasses.field(default_factory=dict)  # client -> weight (default 1)
    cost: str = "linear"
    w_in: float = 1.0
    w_out: float = 2.0

    def __post_init__(self):
        if self.cost not in COSTS:
            raise ConfigError(f"vtc cost must be one of {COSTS}, got '{self.cost}'")
        bad = {c: w for c, w in self.weights.items() if not w > 0}
        if bad:
            raise ConfigError(f"vtc client weights must be > 0, got {bad}")
        if self.w_in < 0 or self.w_out < 0:
            raise ConfigError("vtc w_in and w_out must be >= 0")


@register
class VTC(Policy):
    name = "vtc"
    Args = VTCArgs

    def __init__(self, cfg):
        super().__init__(cfg)
        self.counter: dict[str, float] = {}

    def weight(self, client: str) -> float:
        return float(self.args.weights.get(client, 1.0))

    def _backlogged(self, exclude: Request | None = None) -> set[str]:
        return {r.client for r in self.sched.waiting if r is not exclude}

    def on_arrival(self, req: Request, now: float) -> None:
        u = req.client
        self.counter.setdefault(u, 0.0)
        backlogged = self._backlogged(exclude=req)
        if u not in backlogged:  # the lift: returning from idle earns no credit
            others = [self.counter[v] for v in backlogged if v != u]
            if others:
                self.counter[u] = max(self.counter[u], min(others))

    def charge_admission(self, req: Request) -> None:
        n = req.prompt_len
        cost = self.args.w_in * n if self.args.cost == "linear" else self.sched.cost.prefill_time(n)
        self.counter[req.client] += cost / self.weight(req.client)

    def on_tokens(self, req: Request, num_new: int, now: float) -> None:
        if self.args.cost == "linear":
            cost = self.args.w_out * num_new
        else:
            ctx = max(s.num_computed for s in req.seqs)
            c = self.sched.cost
            cost = num_new * (c.per_decode_token + c.per_decode_ctx * ctx)
        self.counter[req.client] = self.counter.get(req.client, 0.0) + cost / self.weight(
            req.client
        )

    def fits_with_max_tokens(self, sched: Scheduler, req: Request) -> bool:
        """Pages for every running sequence to finish, plus this request's prompt + max_tokens."""
        pool = sched.pool
        committed = sum(
            pool.pages_for(s.prompt_len + s.request.sampling.max_tokens) - len(s.pages)
            for r in sched.running
            for s in r.live_seqs
        )
        need = pool.pages_for(req.prompt_len + req.sampling.max_tokens) * req.sampling.n
        return committed + need <= pool.num_available

    def schedule(self, sched: Scheduler, now: float) -> StepPlan:
        plan = StepPlan()
        self.swap_in_all(sched, plan, sorted(sched.swapped, key=lambda r: r.fcfs_key))
        running = list(sched.running)
        budget = self.serve_running(sched, plan, running)
        while budget > 0 and sched.waiting and not sched.swapped:
            u = min(self._backlogged(), key=lambda c: (self.counter.get(c, 0.0), c))
            req = next(r for r in sched.waiting if r.client == u)  # its oldest request
            if not self.fits_with_max_tokens(sched, req):
                break
            used = self.try_admit(sched, plan, req, budget, now)
            if used == 0:
                break
            self.charge_admission(req)
            budget -= used
        return self.finish_plan(sched, plan)
