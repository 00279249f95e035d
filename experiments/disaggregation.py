"""DistServe: goodput of disaggregated vs colocated instances as the SLOs tighten, on real
engines (small scale) and in the simulator (large scale); the simulator's speed at
cluster scale.

  python -m experiments.disaggregation --workdir=runs/disaggregation
  python -m experiments.disaggregation --config=experiments/configs/disaggregation.py:runlocal \
      --workdir=/tmp/dis

Goodput (DistServe): the highest request rate at which >= 90% of requests meet both the
TTFT and the TPOT SLO, here per device. On real engines it is read off the rates served
(the highest served rate that attains); in the simulator it is searched (doubling, then
bisection: `cluster.placement`). Writes disaggregation.json and disaggregation.png to
--workdir.
"""

from __future__ import annotations

import logging
import math
import time

from experiments import host_devices  # stdlib only

host_devices.simulate(8)  # one simulated CPU device per instance: before jax is imported

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import common  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", common.config_path("disaggregation"), "experiment config", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/disaggregation", "where the results go")


def latency(summary: dict) -> dict:
    return {
        k: {q: summary.get(k, {}).get(q, math.nan) for q in ("mean", "p50", "p90")}
        for k in ("ttft", "tpot")
    }


def calibrate(model, serve, spec):
    """A `CalibratedCost` fitted to one real engine serving the fit trace."""
    from mlx_sched.lab.calibrate import fit_cost
    from mlx_sched.lab.replay import replay
    from mlx_sched.lab.workload import synthetic_trace
    from mlx_sched.serve.engine import Engine

    trace = synthetic_trace(
        spec.num_requests,
        spec.rate,
        spec.preset,
        model.cfg.max_seq_len,
        spec.length_scale,
        None,
        model.cfg.vocab_size,
        seed=spec.seed,
    )
    engine = Engine(model, serve)
    replay(engine, trace)
    arrivals = [r.arrival for r in engine.requests.values()]
    return fit_cost([engine.step_records], [arrivals])


def real_study(config, scales) -> dict:
    from flax import nnx

    from mlx_sched.cluster import placement as pl
    from mlx_sched.cluster.cluster import Cluster
    from mlx_sched.cluster.sim import SimCluster
    from mlx_sched.serve import metrics as metrics_lib
    from mlx_sched.serve.config import ServeConfig
    from mlx_sched.train.loop import model_config
    from models import Transformer

    c = config.real
    model = Transformer(model_config(c.model.to_dict()), nnx.Rngs(0))
    serve = ServeConfig.from_dict(c.serve.to_dict())
    logging.info("real: calibrating the simulator on one engine")
    cost = calibrate(model, serve, c.fit)
    wl = pl.Workload(**c.workload.to_dict())
    layouts = [pl.Layout(0, 2), pl.Layout(1, 1)]
    rates = list(c.rates)
    runs = {}
    for layout in layouts:
        cluster = Cluster.build(model, serve, layout.cluster_config())
        # not measured: a cluster's first steps and first KV moves are slower
        pl.serve_trace(cluster, wl.trace(rates[-1], model.cfg.vocab_size), prefix="warm-")
        rows = []
        for k, rate in enumerate(rates):
            trace = wl.trace(rate, model.cfg.vocab_size)
            before = set(cluster.requests)
            wall = pl.serve_trace(cluster, trace, prefix=f"k{k}-")
            metrics = [
                m
                for rid, m in zip(cluster.requests, cluster.request_metrics(), strict=True)
                if rid not in before
            ]
            real = metrics_lib.summarize(metrics, [], wall)  # this rate's requests
            sim = SimCluster(model.cfg, serve, layout.cluster_config(), cost=cost, shared_host=True)
            sim_out = sim.run(trace)
            rows.append(
                dict(
                    rate=rate,
                    real=latency(real),
                    sim=latency(sim_out),
                    real_metrics=[
                        {k2: m.get(k2) for k2 in ("status", "ttft", "tpot")} for m in metrics
                    ],
                    sim_metrics=[
                        {k2: m.get(k2) for k2 in ("status", "ttft", "tpot")}
                        for m in sim.cluster.request_metrics()
                    ],
                    compiles_after_warmup=list(cluster.compiles),
                )
            )
            logging.info(
                "real: %s at %.1f req/s: TTFT p90 %.3f s (sim %.3f), TPOT p90 %.4f s (sim %.4f)",
                layout.name(),
                rate,
                rows[-1]["real"]["ttft"]["p90"],
                rows[-1]["sim"]["ttft"]["p90"],
                rows[-1]["real"]["tpot"]["p90"],
                rows[-1]["sim"]["tpot"]["p90"],
            )
        cluster.shutdown()
        runs[layout.name()] = rows
    colo = runs[layouts[0].name()][0]["real"]
    base = (c.base_ttft_x * colo["ttft"]["p50"], c.base_tpot_x * colo["tpot"]["p50"])
    table = []
    for s in scales:
        slo = pl.SLO(base[0] * s, base[1] * s)
        row = {"scale": s, "ttft_slo": slo.ttft_s, "tpot_slo": slo.tpot_s}
        for layout in layouts:
            rr = runs[layout.name()]
            for side in ("real", "sim"):
                g = pl.served_goodput(rates, [r[f"{side}_metrics"] for r in rr], slo)
                row[f"{layout.name()} {side}"] = g / layout.devices
        table.append(row)
    # the placement search on this machine's shape (2 devices, one shared host), validated
    slo = pl.SLO(*base)
    best, cands = pl.search(
        model.cfg, serve, wl, slo, 2, cost=cost, start_rate=rates[0], iters=4, shared_host=True
    )
    check = pl.validate(model, serve, best.layout, wl, best.goodput, slo) if best.goodput else None
    return {
        "base_slo": base,
        "runs": runs,
        "goodput_per_device": table,
        "search": {"best": best.layout.name(), "candidates": [x.row() for x in cands]},
        "validation": check,
    }


def sim_study(config, scales) -> dict:
    from mlx_sched.cluster import placement as pl
    from mlx_sched.serve.config import ServeConfig
    from mlx_sched.serve.cost_model import StepTimeModel
    from mlx_sched.train.loop import model_config

    c = config.sim
    mc = model_config(c.model.to_dict())
    serve = ServeConfig.from_dict(c.serve.to_dict())
    cost = StepTimeModel(**{k: v / 1e3 for k, v in c.cost_ms.items()})
    wl = pl.Workload(**c.workload.to_dict())
    slos = [pl.SLO(c.base_slo[0] * s, c.base_slo[1] * s) for s in scales]
    curves = {}
    for layout in pl.layouts(c.num_devices):

        def run(rate, layout=layout):
            return pl.simulated_metrics(mc, serve, layout, wl, rate, cost)

        goodputs, rows = pl.grid_goodputs(run, slos, c.start_rate, c.rate_factor)
        curves[layout] = goodputs
        logging.info(
            "sim: %s: goodput per device %s (req/s, per SLO scale)",
            layout.name(),
            [round(g / layout.devices, 2) for g in goodputs],
        )
    out = []
    for k, (s, slo) in enumerate(zip(scales, slos, strict=True)):
        per = {lay: g[k] / lay.devices for lay, g in curves.items()}
        colo = max((x for x in per if not x.disaggregated), key=lambda x: (per[x], -x.devices))
        dis = max((x for x in per if x.disaggregated), key=lambda x: (per[x], -x.devices))
        best = colo if per[colo] >= per[dis] else dis
        out.append(
            {
                "scale": s,
                "ttft_slo": slo.ttft_s,
                "tpot_slo": slo.tpot_s,
                "best": best.name(),
                "colocated": colo.name(),
                "colocated_per_device": per[colo],
                "disaggregated": dis.name(),
                "disaggregated_per_device": per[dis],
                "candidates": [
                    {"layout": x.name(), "devices": x.devices, "goodput_per_device": per[x]}
                    for x in per
                ],
            }
        )
    return {"base_slo": list(c.base_slo), "by_scale": out}


def speed_study(config) -> dict:
    from mlx_sched.cluster.config import ClusterConfig
    from mlx_sched.cluster.sim import SimCluster
    from mlx_sched.lab.workload import synthetic_trace
    from mlx_sched.serve.config import ServeConfig
    from mlx_sched.train.loop import model_config

    c = config.speed
    mc = model_config(config.real.model.to_dict())
    serve = ServeConfig(page_size=16, num_pages=2048, max_seqs=64, token_budget=512, slice_len=8)
    trace = synthetic_trace(
        c.num_requests, c.rate, c.preset, mc.max_seq_len, 1.0, None, mc.vocab_size, seed=0
    )
    sim = SimCluster(mc, serve, ClusterConfig(num_instances=c.instances))
    t0 = time.perf_counter()
    out = sim.run(trace)["sim"]
    out["requests"] = c.num_requests
    out["instances"] = c.instances
    out["projected_1m_s"] = 1e6 * (time.perf_counter() - t0) / c.num_requests
    logging.info("speed: %s", out)
    return out


def plot(out: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("real", "sim") if k in out]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, key in zip(axes[0], panels, strict=True):
        if key == "real":
            rows = out["real"]["goodput_per_device"]
            xs = [r["scale"] for r in rows]
            for name in [k for k in rows[0] if k.endswith(" real") or k.endswith(" sim")]:
                style = "-o" if name.endswith("real") else "--x"
                ax.plot(xs, [r[name] for r in rows], style, label=name)
            ax.set_title("real engines, 2 devices (one host)")
        else:
            rows = out["sim"]["by_scale"]
            xs = [r["scale"] for r in rows]
            ax.plot(xs, [r["colocated_per_device"] for r in rows], "-o", label="best colocated")
            ax.plot(
                xs, [r["disaggregated_per_device"] for r in rows], "-s", label="best disaggregated"
            )
            ax.set_title("simulator, OPT-13B step model, 4 devices")
        ax.set_xlabel("SLO scale (x base; smaller = tighter)")
        ax.set_ylabel("goodput per device (req/s)")
        ax.invert_xaxis()
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    from mlx_sched.serve import metrics

    config = _CONFIG.value
    workdir = common.claim_workdir(_WORKDIR.value)
    unknown = set(config.studies) - {"real", "sim", "speed"}
    if unknown:
        raise common.ConfigError(f"disaggregation: unknown studies {sorted(unknown)}")
    scales = list(config.slo_scales)
    out = {}
    if "real" in config.studies:
        out["real"] = real_study(config, scales)
    if "sim" in config.studies:
        out["sim"] = sim_study(config, scales)
    if "speed" in config.studies:
        out["speed"] = speed_study(config)
    metrics.write_json(workdir / "disaggregation.json", out)
    plot(out, workdir / "disaggregation.png")
    print(f"\nJSON and plot in {workdir}: disaggregation.json, disaggregation.png")


if __name__ == "__main__":
    common.run(main)
