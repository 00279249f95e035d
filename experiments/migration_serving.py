"""Serving a trace through a cluster, for the studies of experiments/migration.py: the
model, the cluster and the trace, an online replay of the trace, the latency summary of a
run, and the paired comparison of two arms over the same traces (seeds).
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import re
import time

import numpy as np

from experiments import common
from experiments import migration_report as report


def make_model(model_cfg: dict):
    from flax import nnx

    from models import ModelConfig, Transformer

    return Transformer(ModelConfig.from_dict(model_cfg), nnx.Rngs(0))


def make_cluster(model, serve: dict, cluster: dict):
    from mlx_sched.cluster import Cluster, ClusterConfig
    from mlx_sched.serve.config import ServeConfig

    return Cluster.build(model, ServeConfig.from_dict(serve), ClusterConfig.from_dict(cluster))


def make_trace(load, vocab: int, seed: int, high_share: float = 0.0):
    """The load's Gamma / heavy-tailed trace; a `high_share` of it (seeded) is priority 1."""
    from mlx_sched.lab import workload

    trace = workload.synthetic_trace(
        n=load.num_requests,
        rate=load.rate,
        preset=load.preset,
        max_total=load.max_total,
        length_scale=load.length_scale,
        cv=load.cv,
        vocab=vocab,
        seed=seed,
    )
    high = np.random.default_rng([seed, 1]).random(len(trace)) < high_share
    return [
        dataclasses.replace(r, priority=1, client="high") if h else r
        for r, h in zip(trace, high, strict=True)
    ]


def replay(cluster, trace) -> float:
    """Serve `trace` online: a request is added once the wall clock passes its arrival (which
    it keeps as its arrival time); returns the seconds until the last token."""
    from mlx_sched.serve.request import SamplingParams

    t0, k = time.time(), 0
    while k < len(trace) or cluster.has_work():
        now = time.time() - t0
        while k < len(trace) and trace[k].arrival <= now:
            r = trace[k]
            sampling = SamplingParams(max_tokens=r.max_tokens, ignore_eos=True)
            cluster.add_request(
                r.prompt, sampling, f"r{k}", r.client, r.priority, arrival=t0 + r.arrival
            )
            k += 1
        if cluster.has_work():
            cluster.step()
        elif k < len(trace):
            time.sleep(min(0.01, max(0.0, trace[k].arrival - now)))
    return time.time() - t0


def latency(request_metrics: list[dict]) -> dict:
    """Percentiles of TTFT, TPOT, E2E over finished requests; preemption and migration counts."""
    from mlx_sched.serve.metrics import percentiles

    done = [m for m in request_metrics if m["status"] == "finished"]
    out = {
        "requests": len(request_metrics),
        "finished": len(done),
        "preemptions": sum(m["preemptions"] for m in request_metrics),
        "preempted_requests": sum(m["preemptions"] > 0 for m in request_metrics),
        "migrated_requests": sum(m["migrations"] > 0 for m in request_metrics),
    }
    return out | {k: percentiles([m[k] for m in done if k in m]) for k in report.LATENCIES}


def serve_point(model, config, trace, serve=None, **cluster) -> tuple[dict, list[dict]]:
    """One cluster (config.serve and config.cluster, with overrides) serving `trace`: its
    summary row and every request's metrics."""
    serve = {**config.serve.to_dict(), **(serve or {})}
    c = make_cluster(model, serve, {**config.cluster.to_dict(), **cluster})
    with common.CpuMeter() as cpu:
        wall = replay(c, trace)
    s = c.summary(wall)
    ms = [{k: v for k, v in r.metrics().items() if k != "itl"} for r in c.requests.values()]
    row = {
        "wall_s": wall,
        "other_cores": cpu.other_cores,  # other processes' CPU use while it ran
        "migrations": s["migrations"],
        "moves_aborted": s["moves_aborted"],
        "move_outcomes": dict(
            collections.Counter(re.sub(r"\d+", "N", m["outcome"]) for m in c.move_log)
        ),
        "kv_bytes_moved": s["kv_bytes_moved"],
        "compiles": sum(s["compiles_after_warmup"]),  # 0: every shape compiled at warm-up
        "migration_downtime": s["migration_downtime"],
    } | latency(ms)
    c.shutdown()
    del c
    gc.collect()
    return row, ms


PAIRED = {  # per-run figures compared per trace (seed) between two arms
    "ttft_p99": lambda r: r["ttft"]["p99"],
    "e2e_p99": lambda r: r["e2e"]["p99"],
    "tpot_p99": lambda r: r["tpot"]["p99"],
    "e2e_p50": lambda r: r["e2e"]["p50"],
    "preemptions": lambda r: r["preemptions"],
}


def paired(base: dict, other: dict) -> dict:
    """Per metric of PAIRED, over seeds run in both arms ({seed: row}): the median of
    other / base, and in how many seeds `other` was lower and higher."""
    seeds = sorted(set(base) & set(other))
    out = {}
    for name, f in PAIRED.items():
        a, b = np.array([f(base[s]) for s in seeds]), np.array([f(other[s]) for s in seeds])
        ok = a > 0
        out[name] = {
            "median_ratio": float(np.median(b[ok] / a[ok])) if ok.any() else float("nan"),
            "lower": int((b < a).sum()),
            "higher": int((b > a).sum()),
            "seeds": len(seeds),
        }
    return out


def progress(tag: str, row: dict) -> None:
    ms = lambda key, p: f"{1e3 * row[key][p]:.0f}"
    print(
        f"[{tag}] {row['finished']}/{row['requests']} in {row['wall_s']:.1f} s: "
        f"TTFT p50/p99 {ms('ttft', 'p50')}/{ms('ttft', 'p99')} ms, "
        f"E2E p50/p99 {ms('e2e', 'p50')}/{ms('e2e', 'p99')} ms, "
        f"preemptions {row['preemptions']}, migrations {row['migrations']} "
        f"(other processes: {row['other_cores']:.2f} cores)",
        flush=True,
    )


def warm_up(model, config) -> None:
    """Serve a few requests once: a process's first steps are slower than its later ones."""
    trace = make_trace(config.load, config.model.vocab_size, seed=1000)
    serve_point(model, config, trace[: config.warmup_requests], migration=True)
