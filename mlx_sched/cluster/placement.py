"""DistServe's placement search: how many prefill and decode instances (and how many
devices each) serve a workload with the most goodput per device.

Goodput (reference/algorithms.md) is the highest request rate at which >= 90% of the
requests meet both the TTFT and the TPOT SLO. For each candidate layout within the
device count, `search` finds it by simulation (`cluster.sim.SimCluster`: the cluster's
own dispatch, hand-over and engine code over the cost model), doubling the rate until
the SLOs fail and then bisecting; the layout with the highest goodput per device wins.
`validate` serves the chosen layout's rate on real engines and measures the attainment.

    slo = SLO(ttft_s=0.5, tpot_s=0.05)
    best, table = search(model_cfg, serve, workload, slo, num_devices=4, cost=cost)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

from mlx_sched.cluster.config import ClusterConfig
from mlx_sched.cluster.sim import SimCluster
from mlx_sched.lab import slo as slo_lib
from mlx_sched.lab.workload import synthetic_trace
from models.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float
    attainment: float = 0.9  # the share of requests that must meet both

    def __post_init__(self):
        for name in ("ttft_s", "tpot_s"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ConfigError(f"SLO {name} must be a positive number of seconds, got {v!r}")
        if not 0 < self.attainment <= 1:
            raise ConfigError(f"SLO attainment must be in (0, 1], got {self.attainment}")

    def attained(self, request_metrics: Sequence[dict]) -> float:
        return slo_lib.slo_attainment(list(request_metrics), self.ttft_s, self.tpot_s)


@dataclasses.dataclass(frozen=True)
class Workload:
    """Requests of a length preset arriving as a Poisson stream (or Gamma with `cv`):
    `num_requests`, or as many as arrive in `min_duration_s` at the rate if more (a fixed
    count at a high rate is a short burst that any layout absorbs: a sustained overload
    needs arrivals over a while)."""

    preset: str = "sharegpt"
    max_total: int = 1024
    length_scale: float = 1.0
    num_requests: int = 400
    cv: float | None = None
    seed: int = 0
    min_duration_s: float = 0.0

    def count(self, rate: float) -> int:
        return max(self.num_requests, math.ceil(rate * self.min_duration_s))

    def trace(self, rate: float, vocab: int):
        return synthetic_trace(
            self.count(rate),
            rate,
            self.preset,
            self.max_total,
            self.length_scale,
            self.cv,
            vocab,
            seed=self.seed,
        )


@dataclasses.dataclass(frozen=True)
class Layout:
    """Instances and their devices: colocated (`prefill == 0`: `decode` instances serve
    whole requests) or disaggregated."""

    prefill: int
    decode: int
    prefill_devices: int = 1
    decode_devices: int = 1

    @property
    def devices(self) -> int:
        return self.prefill * self.prefill_devices + self.decode * self.decode_devices

    @property
    def disaggregated(self) -> bool:
        return self.prefill > 0

    @property
    def roles(self) -> tuple[str, ...]:
        if not self.disaggregated:
            return ("both",) * self.decode
        return ("prefill",) * self.prefill + ("decode",) * self.decode

    @property
    def per_instance_devices(self) -> list[int]:
        return [self.prefill_devices] * self.prefill + [self.decode_devices] * self.decode

    def name(self) -> str:
        if not self.disaggregated:
            return f"colocated {self.decode}x{self.decode_devices}"
        return (
            f"prefill {self.prefill}x{self.prefill_devices} + "
            f"decode {self.decode}x{self.decode_devices}"
        )

    def cluster_config(self, **kw) -> ClusterConfig:
        roles = self.roles
        return ClusterConfig(num_instances=len(roles), roles=roles, **kw)


def layouts(
    num_devices: int, parallel: Sequence[int] = (1,), colocated: bool = True
) -> list[Layout]:
    """Every layout within `num_devices`, instances of `parallel` devices each."""
    if num_devices < 1:
        raise ConfigError(f"num_devices must be >= 1, got {num_devices}")
    out = []
    for d in parallel:
        if colocated:
            out += [Layout(0, k, 1, d) for k in range(1, num_devices // d + 1)]
    for dp in parallel:
        for dq in parallel:
            for p in range(1, num_devices // dp + 1):
                for q in range(1, (num_devices - p * dp) // dq + 1):
                    out.append(Layout(p, q, dp, dq))
    return out


def tp_speedup(devices: int, scaling: float) -> float:
    """Device-time speed-up of an instance on `devices` devices: devices ** scaling (1: a
    perfect split; a modelled assumption where no multi-device step was measured)."""
    return float(devices) ** scaling


@dataclasses.dataclass
class Point:
    rate: float
    attainment: float
    ttft_p90: float
    tpot_p90: float


def simulate(
    model_cfg,
    serve,
    layout: Layout,
    workload: Workload,
    rate: float,
    slo: SLO,
    cost=None,
    tp_scaling: float = 0.9,
    shared_host: bool = False,
    cluster_kw: dict | None = None,
) -> Point:
    sim = SimCluster(
        model_cfg,
        serve,
        layout.cluster_config(**(cluster_kw or {})),
        cost=cost,
        speedups=[tp_speedup(d, tp_scaling) for d in layout.per_instance_devices],
        shared_host=shared_host,
        seed=workload.seed,
    )
    out = sim.run(workload.trace(rate, model_cfg.vocab_size))
    return Point(
        rate,
        slo.attained(sim.cluster.request_metrics()),
        out.get("ttft", {}).get("p90", math.inf),
        out.get("tpot", {}).get("p90", math.inf),
    )


def grid_goodputs(
    run: Callable[[float], list[dict]],
    slos: Sequence[SLO],
    start: float,
    factor: float = 1.25,
    max_steps: int = 40,
) -> tuple[list[float], list[dict]]:
    """Goodput under each of `slos` from one sweep of rates: `run(rate)` serves a rate and
    returns its request metrics; rates grow by `factor` from `start` until every SLO fails
    (attainment falls as the rate grows), each served once for all SLOs. A goodput is the
    highest grid rate that attains (a resolution of `factor`)."""
    if factor <= 1 or start <= 0:
        raise ConfigError(f"grid_goodputs: start > 0 and factor > 1, got {start}, {factor}")
    best = [0.0] * len(slos)
    rows, rate = [], start
    for _ in range(max_steps):
        metrics = run(rate)
        att = [slo.attained(metrics) for slo in slos]
        rows.append({"rate": rate, "attainment": att})
        ok = [a >= slo.attainment for a, slo in zip(att, slos, strict=True)]
        best = [rate if k else b for k, b in zip(ok, best, strict=True)]
        if not any(ok):
            break
        rate *= factor
    return best, rows


def simulated_metrics(
    model_cfg, serve, layout: Layout, workload: Workload, rate: float, cost=None, **kw
) -> list[dict]:
    """The request metrics of `layout` serving `workload` at `rate` in the simulator (`kw`:
    tp_scaling, shared_host)."""
    sim = SimCluster(
        model_cfg,
        serve,
        layout.cluster_config(),
        cost=cost,
        speedups=[tp_speedup(d, kw.get("tp_scaling", 0.9)) for d in layout.per_instance_devices],
        shared_host=kw.get("shared_host", False),
        seed=workload.seed,
    )
    sim.run(workload.trace(rate, model_cfg.vocab_size))
    return sim.cluster.request_metrics()


def goodput(
    run: Callable[[float], Point], slo: SLO, start: float, iters: int = 6, max_doublings: int = 12
) -> tuple[float, list[Point]]:
    """The highest rate whose attainment >= slo.attainment: double from `start` until it
    fails, then bisect `iters` times (attainment falls as the rate grows)."""
    points: list[Point] = []
    lo, hi, rate = 0.0, None, start
    for _ in range(max_doublings):
        p = run(rate)
        points.append(p)
        if p.attainment >= slo.attainment:
            lo, rate = rate, rate * 2
        else:
            hi = rate
            break
    if hi is None:
        return lo, points
    for _ in range(iters):
        mid = (lo + hi) / 2
        p = run(mid)
        points.append(p)
        lo, hi = (mid, hi) if p.attainment >= slo.attainment else (lo, mid)
    return lo, points


def served_goodput(
    rates: Sequence[float], metrics_per_rate: Sequence[Sequence[dict]], slo
) -> float:
    """Goodput read off rates actually served: the highest rate whose requests' attainment
    reaches `slo.attainment` (0 if none)."""
    ok = [
        r for r, m in zip(rates, metrics_per_rate, strict=True) if slo.attained(m) >= slo.attainment
    ]
    return max(ok) if ok else 0.0


@dataclasses.dataclass
class Candidate:
    layout: Layout
    goodput: float  # requests / s
    points: list[Point]

    @property
    def per_device(self) -> float:
        return self.goodput / self.layout.devices

    def row(self) -> dict:
        return {
            "layout": self.layout.name(),
            "devices": self.layout.devices,
            "goodput": self.goodput,
            "goodput_per_device": self.per_device,
            "points": [dataclasses.asdict(p) for p in self.points],
        }


def search(
    model_cfg,
    serve,
    workload: Workload,
    slo: SLO,
    num_devices: int,
    cost=None,
    parallel: Sequence[int] = (1,),
    tp_scaling: float = 0.9,
    start_rate: float = 1.0,
    iters: int = 6,
    shared_host: bool = False,
    colocated: bool = True,
    progress=None,
) -> tuple[Candidate, list[Candidate]]:
    """The layout with the most goodput per device, and every candidate's result."""
    table = []
    for layout in layouts(num_devices, parallel, colocated):

        def run(rate, layout=layout):
            return simulate(
                model_cfg, serve, layout, workload, rate, slo, cost, tp_scaling, shared_host
            )

        g, points = goodput(run, slo, start_rate, iters)
        table.append(Candidate(layout, g, points))
        if progress is not None:
            progress(f"{layout.name()}: goodput {g:.2f} req/s ({g / layout.devices:.2f}/device)")
    best = max(table, key=lambda c: (c.per_device, -c.layout.devices))
    return best, table


def serve_trace(cluster, trace, clock=None, prefix: str = "r") -> float:
    """Serve `trace` on a real `Cluster`, each request added (as `prefix` + its index) when
    the wall clock passes its arrival; returns the seconds from the start to the last
    token."""
    import dataclasses as dc
    import time

    from mlx_sched.serve.request import SamplingParams

    clock = clock or time.time
    order = sorted(range(len(trace)), key=lambda i: trace[i].arrival)
    t0, nxt = clock(), 0
    while nxt < len(order) or cluster.has_work():
        now = clock() - t0
        while nxt < len(order) and trace[order[nxt]].arrival <= now:
            r = trace[order[nxt]]
            sp = dc.replace(SamplingParams(), max_tokens=r.max_tokens, ignore_eos=True)
            cluster.add_request(
                r.prompt, sp, f"{prefix}{order[nxt]}", r.client, r.priority, t0 + r.arrival
            )
            nxt += 1
        if cluster.has_work():
            cluster.step()
        elif nxt < len(order):
            time.sleep(min(0.01, max(0.0, trace[order[nxt]].arrival - (clock() - t0))))
    return clock() - t0


def validate(model, serve, layout: Layout, workload: Workload, rate: float, slo: SLO) -> dict:
    """Serve the workload at `rate` on real engines in the chosen layout (in process, one
    device per instance); the measured attainment and latencies."""
    from mlx_sched.cluster.cluster import Cluster

    if layout.devices != layout.prefill + layout.decode:
        raise ConfigError("validate runs one device per instance on this backend")
    cluster = Cluster.build(model, serve, layout.cluster_config())
    try:
        wall = serve_trace(cluster, workload.trace(rate, model.cfg.vocab_size))
        out = cluster.summary(wall)
        metrics = cluster.request_metrics()
    finally:
        cluster.shutdown()
    return {
        "layout": layout.name(),
        "rate": rate,
        "attainment": slo.attained(metrics),
        "ttft": out.get("ttft"),
        "tpot": out.get("tpot"),
        "compiles_after_warmup": out["compiles_after_warmup"],
    }
