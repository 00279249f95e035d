"""The cluster on simulated instances: the same global scheduler, dispatch, hand-over,
migration and engine policy code, with each instance's device a cost model.

    sim = SimCluster(model_cfg, ServeConfig(...), ClusterConfig(num_instances=16))
    result = sim.run(trace)          # every request of a `lab.workload` trace
    result["ttft"]["p90"], result["sim"]["us_per_batch"]

Each instance is an `Engine` over a `lab.simulator.SimRunner` with a clock of its own;
the instances run side by side, as on their own devices (or, `shared_host`, one at a
time, as the in-process backend steps them on one host), and a discrete-event loop
drives them: the earliest event first, among

- an arrival: the request is dispatched (`Cluster.add_request`) at its time;
- an instance ready to step: it runs one step (its clock advances by the modelled host
  and device time); the step's report reaches the global scheduler when the step ends;
- a report: the global scheduler takes it (`Cluster.absorb`), then hands prefilled
  requests over, advances KV moves and maybe starts a migration (`Cluster.coordinate`);
- a KV copy arriving (moves over a modelled link of `link_bytes_per_s`).

An instance's step runs (in the engine) when it starts, its report is taken when it
ends; meanwhile the instance is `in_flight`, and the global scheduler touches a request
there (a hand-over's pause, a move's stages, a migration's choice of source) only between
its steps, as the real cluster does. A destination may take a reservation, KV or an
imported request while its own step is under way: its next step serves it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import heapq
import math
import time

from mlx_sched.cluster.backends import LocalInstance
from mlx_sched.cluster.build import instance_serve
from mlx_sched.cluster.cluster import Cluster
from mlx_sched.cluster.config import ClusterConfig
from mlx_sched.cluster.instance import InstanceServer
from mlx_sched.lab.simulator import sim_engine
from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.cost_model import StepTimeModel
from mlx_sched.serve.request import SamplingParams

# KV between instances: a 100 Gb/s link (DistServe's cross-node setting); in-process
# copies on one host are faster, so this is the conservative default.
LINK_BYTES_PER_S = 12.5e9


# The garbage collector's thresholds while a simulation runs. It allocates many short-lived
# objects (plans, outputs) while the requests' records only grow: with Python's defaults
# (700, 10, 10) the collector rescans that growing heap so often that it took 18.6 s of a
# 100,000-request run (16 instances), 6.6 s with these. A full collection can still run
# after every 2M allocations (once the heap has grown by a quarter): the engines' retired
# requests (reference cycles) are freed as before.
GC_THRESHOLD = (10_000, 20, 10)


@contextlib.contextmanager
def gc_tuned(threshold: tuple[int, int, int] = GC_THRESHOLD):
    """Run the body with the collector's `threshold`, then restore the previous one."""
    old = gc.get_threshold()
    gc.set_threshold(*threshold)
    try:
        yield
    finally:
        gc.set_threshold(*old)


@dataclasses.dataclass
class Scaled:
    """A cost model whose device time is divided by `speedup` (an instance on more devices:
    tensor parallelism, modelled; host time unchanged)."""

    cost: object
    speedup: float = 1.0

    def __getattr__(self, name):
        return getattr(self.cost, name)

    def simulate(self, *args):
        before, device, after = self.cost.simulate(*args)
        return before, device / self.speedup, after


class SimCluster:
    """A `Cluster` of `cfg.num_instances` simulated engines of `model_cfg` with `serve`.

    `cost`: the instances' cost model (`StepTimeModel` prior by default, or a calibrated
    `lab.step_cost.CalibratedCost`); `speedups[i]` divides instance i's device time
    (tensor-parallel instances, modelled)."""

    def __init__(
        self,
        model_cfg,
        serve: ServeConfig,
        cfg: ClusterConfig,
        cost=None,
        speedups: list[float] | None = None,
        link_bytes_per_s: float = LINK_BYTES_PER_S,
        seed: int = 0,
        shared_host: bool = False,
    ):
        serve = instance_serve(serve)
        n = cfg.num_instances
        speedups = list(speedups or [1.0] * n)
        if len(speedups) != n or min(speedups) <= 0:
            raise ValueError(f"speedups: {n} positive factors expected, got {speedups}")
        self.now = 0.0

        def cost_for(s: float):
            base = cost if cost is not None else StepTimeModel()
            return base if s == 1.0 else Scaled(base, s)

        self.engines = [
            sim_engine(model_cfg, serve, cost_for(s), seed + i) for i, s in enumerate(speedups)
        ]
        instances = [
            LocalInstance(InstanceServer(e, f"sim-{i}")) for i, e in enumerate(self.engines)
        ]
        self.cluster = Cluster(
            instances,
            cfg,
            serve,
            model_cfg.vocab_size,
            serve.max_len(model_cfg.max_seq_len),
            clock=lambda: self.now,
            link_bytes_per_s=link_bytes_per_s,
        )
        self.shared_host = shared_host  # one host steps the instances in turn (in process)
        self.wall_s = 0.0
        self.events = 0

    def run(self, trace, sampling: SamplingParams | None = None, progress=None) -> dict:
        """Serve every request of `trace` (`lab.workload.TraceRequest`s; outputs forced to
        their lengths); returns the cluster's summary with a "sim" section: simulated
        steps and batches, and the simulator's own wall time."""
        with gc_tuned():
            return self._run(trace, sampling, progress)

    def _run(self, trace, sampling: SamplingParams | None, progress) -> dict:
        t_wall = time.perf_counter()
        base = sampling or SamplingParams()
        c, engines = self.cluster, self.engines
        insts = c.instances
        clocks = [e.clock for e in engines]
        busy, dead, moves = c.busy, c.dead, c.moves  # the cluster's own, updated in place
        order = sorted(range(len(trace)), key=lambda i: trace[i].arrival)
        nxt, n_arr = 0, len(order)
        inflight: list[tuple[float, int, int, object]] = []  # (end, seq, instance, report)
        # not ready to step: in flight (its report not taken yet: `Cluster.in_flight`), or
        # parked (stepped without progress: it waits for another event)
        in_flight = c.in_flight
        parked: set[int] = set()
        seq = 0
        host_free = 0.0  # shared_host: when the one host can step the next instance
        inf = math.inf
        while True:
            now = self.now
            t_arr = trace[order[nxt]].arrival if nxt < n_arr else inf
            t_rep = inflight[0][0] if inflight else inf
            t_move = (
                min((m.ready_at for m in moves.values() if m.ready_at > now), default=inf)
                if moves
                else inf
            )
            # the next instance to step: the earliest ready (none starts before `floor`),
            # then, among ties (a shared host), the one that has waited longest
            floor = now if now > host_free else host_free
            t_step, who, key = inf, -1, None
            for i, ready in enumerate(busy):
                if ready and i not in in_flight and i not in parked and i not in dead:
                    ci = clocks[i].now
                    k = (ci if ci > floor else floor, ci)
                    if key is None or k < key:
                        key, who = k, i
            if key is not None:
                t_step = key[0]
            t = min(t_rep, t_arr, t_move, t_step)
            if t == inf:
                break
            self.events += 1
            if t > now:
                self.now = t
            if t_rep <= t:  # a step's report reaches the global scheduler
                _, _, i, rep = heapq.heappop(inflight)
                in_flight.discard(i)
                c.absorb(i, rep)
                if i not in dead:  # requests may have arrived there during the step
                    busy[i] = busy[i] or engines[i].has_work()
                c.coordinate()
                parked.clear()
            elif t_arr <= t:
                r = trace[order[nxt]]
                sp = dataclasses.replace(
                    base, max_tokens=r.max_tokens, seed=base.seed + order[nxt], ignore_eos=True
                )
                c.add_request(
                    r.prompt, sp, f"r{order[nxt]}", r.client, r.priority, r.arrival, r.deadline
                )
                nxt += 1
                parked.clear()
                if progress is not None and nxt % 10_000 == 0:
                    progress(nxt, n_arr)
            elif t_move <= t:
                c.coordinate()
                parked.clear()
            else:
                i, clock = who, clocks[who]
                if clock.now < t:  # idle until now: it wakes up for the work
                    clock.advance_to(t)
                before = clock.now
                rep = insts[i].call("step")
                rep = rep.error if rep.error is not None else rep.value
                clock.settle()
                if self.shared_host:
                    host_free = clock.now
                if getattr(rep, "has_work", False) and not rep.outputs and clock.now == before:
                    parked.add(i)  # nothing schedulable here until something changes
                    continue
                in_flight.add(i)
                heapq.heappush(inflight, (clock.now, seq, i, rep))
                seq += 1
        if c.has_work():
            stuck = [r.id for r in c.requests.values() if not r.finished][:5]
            raise RuntimeError(f"the simulated cluster stalled with requests unfinished: {stuck}")
        self.wall_s = time.perf_counter() - t_wall
        return self.summary()

    def summary(self) -> dict:
        start = min((r.arrival for r in self.cluster.requests.values()), default=0.0)
        out = self.cluster.summary(self.now - start)
        steps = sum(e.runner.steps for e in self.engines)
        batches = sum(e.runner.batches for e in self.engines)
        out["sim"] = {
            "wall_s": self.wall_s,
            "steps": steps,
            "batches": batches,
            "events": self.events,
            "us_per_batch": 1e6 * self.wall_s / max(1, batches),
            "us_per_step": 1e6 * self.wall_s / max(1, steps),
            "requests_per_s": len(self.cluster.requests) / max(self.wall_s, 1e-9),
        }
        return out
