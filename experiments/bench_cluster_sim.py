"""How fast the cluster simulator simulates: `cluster.sim.SimCluster` (the global scheduler,
Llumnix dispatch and every instance's engine, scheduler and policy on a modelled device)
serving a long trace over 16 instances, against the issue's budgets.

  python -m experiments.bench_cluster_sim                            # 1,000,000 requests
  python -m experiments.bench_cluster_sim --num_requests=20000 --repeats=3
  python -m experiments.bench_cluster_sim --num_requests=200 --instances=4 --workdir=/tmp/b

The trace: `--num_requests` ShareGPT-like requests (lengths clipped to the model's 512-token
context: ~187 prompt and ~194 output tokens on average) arriving as a Poisson stream at
`--rate` per second (default 400/s over 16 instances: 25 per instance, busy but not
overloaded), as `experiments.disaggregation`'s speed study: its small model, FCFS, token
budget 512, slice length 8, the step-time model's prior as the device.

Reported, best and median of `--repeats`: wall seconds of the simulation (the trace is made
before the clock starts), microseconds per simulated batch (one decode iteration or one mixed
step: a slice of S iterations counts S) and per engine step, requests simulated per second,
and the process's peak resident memory; then the budgets: 1,000,000 requests in 60 s
(measured at that size, else projected linearly from the median run, which flatters: a
longer run keeps more requests' records), and >= 10x Vidur's speed per batch.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import resource
import statistics
import time

from absl import flags

from experiments import common

_NUM_REQUESTS = flags.DEFINE_integer("num_requests", 1_000_000, "requests in the trace")
_INSTANCES = flags.DEFINE_integer("instances", 16, "simulated instances")
_RATE = flags.DEFINE_float("rate", 400.0, "arrivals per simulated second (Poisson)")
_REPEATS = flags.DEFINE_integer("repeats", 1, "repetitions (best and median are reported)")
_WORKDIR = flags.DEFINE_string("workdir", "", "where bench_cluster_sim.json goes (optional)")

TARGET_REQUESTS, TARGET_S = 1_000_000, 60.0
VIDUR_US_PER_BATCH = (140.0, 170.0)  # Vidur on this machine (the figure)


def setup():
    """The speed study's model and serving settings (experiments.disaggregation)."""
    from experiments.configs.disaggregation import get_config
    from mlx_sched.serve.config import ServeConfig
    from mlx_sched.train.loop import model_config

    mc = model_config(get_config().real.model.to_dict())
    serve = ServeConfig(page_size=16, num_pages=2048, max_seqs=64, token_budget=512, slice_len=8)
    return mc, serve


def simulate_once(mc, serve, trace, instances: int) -> dict:
    """One simulation of `trace`: wall time and what was simulated."""
    from mlx_sched.cluster.config import ClusterConfig
    from mlx_sched.cluster.sim import SimCluster

    def progress(done, total):
        if done % 100_000 == 0:
            logging.info("%d / %d requests dispatched", done, total)

    sim = SimCluster(mc, serve, ClusterConfig(num_instances=instances))
    t0 = time.perf_counter()
    out = sim.run(trace, progress=progress)
    wall = time.perf_counter() - t0
    s = out["sim"]
    return {
        "wall_s": wall,
        "requests": out["requests"],
        "finished": out["finished"],
        "steps": s["steps"],
        "batches": s["batches"],
        "events": s["events"],
        "simulated_s": sim.now,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main(argv):
    del argv
    from mlx_sched.lab.workload import synthetic_trace

    n, instances = _NUM_REQUESTS.value, _INSTANCES.value
    if n < 1 or instances < 1 or _REPEATS.value < 1 or _RATE.value <= 0:
        raise common.ConfigError("--num_requests, --instances, --repeats and --rate must be > 0")
    mc, serve = setup()
    t0 = time.perf_counter()
    trace = synthetic_trace(
        n, _RATE.value, "sharegpt", mc.max_seq_len, 1.0, None, mc.vocab_size, seed=0
    )
    print(
        f"cluster simulator: {n:,} ShareGPT-like requests (Poisson, {_RATE.value:g}/s; trace "
        f"made in {time.perf_counter() - t0:.1f} s) over {instances} instances, FCFS, slice_len "
        f"{serve.slice_len}, the StepTimeModel prior; best / median of {_REPEATS.value} runs"
    )
    with common.CpuMeter() as cpu:
        runs = [simulate_once(mc, serve, trace, instances) for _ in range(_REPEATS.value)]
    r = runs[0]
    if any(
        (x["steps"], x["batches"], x["events"]) != (r["steps"], r["batches"], r["events"])
        for x in runs
    ):
        raise RuntimeError("the simulation is not deterministic: runs differ")
    if r["finished"] != n:
        raise RuntimeError(f"{n - r['finished']} requests did not finish")
    walls = [x["wall_s"] for x in runs]
    best, med = min(walls), statistics.median(walls)
    row = {
        **{k: r[k] for k in ("requests", "steps", "batches", "events", "simulated_s")},
        "instances": instances,
        "rate": _RATE.value,
        "wall_s": [best, med],
        "us_per_batch": [1e6 * best / r["batches"], 1e6 * med / r["batches"]],
        "us_per_step": [1e6 * best / r["steps"], 1e6 * med / r["steps"]],
        "requests_per_s": [n / best, n / med],
        "peak_rss_gb": max(x["peak_rss_gb"] for x in runs),
        "other_cores": cpu.other_cores,
    }
    print(
        "| requests | instances | steps | batches | wall s | us / batch | us / step "
        "| requests / s | peak RSS GB |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {n} | {instances} | {r['steps']} | {r['batches']} | "
        + " | ".join(
            f"{row[k][0]:.1f} / {row[k][1]:.1f}" for k in ("wall_s", "us_per_batch", "us_per_step")
        )
        + f" | {row['requests_per_s'][0]:.0f} / {row['requests_per_s'][1]:.0f} | "
        f"{row['peak_rss_gb']:.2f} |"
    )
    print(
        f"other processes used {cpu.other_cores:.2f} CPU cores on average while it ran (of "
        f"{os.cpu_count()}); the simulation itself runs on one"
    )
    if n == TARGET_REQUESTS:
        total, how = med, "measured"
    else:
        total, how = med * TARGET_REQUESTS / n, f"projected from {n:,} (linear)"
    row["seconds_for_1m"] = total
    row["seconds_for_1m_how"] = how
    lo, hi = VIDUR_US_PER_BATCH
    us = row["us_per_batch"][1]
    verdict = "met" if total <= TARGET_S else f"NOT met, {total / TARGET_S:.1f}x over"
    print(
        f"1,000,000 requests over {instances} instances: {total:.0f} s, {how} (budget "
        f"{TARGET_S:.0f} s: {verdict})"
    )
    print(
        f"{us:.1f} us per simulated batch (median run) = {lo / us:.1f}-{hi / us:.1f}x Vidur's "
        f"speed ({lo:.0f}-{hi:.0f} us; target >= 10x: {'met' if lo / us >= 10 else 'NOT met'})"
    )
    if _WORKDIR.value:
        workdir = common.require_workdir(_WORKDIR.value)
        path = pathlib.Path(workdir) / "bench_cluster_sim.json"
        path.write_text(json.dumps(row, indent=1))
        logging.info("wrote %s", path)


if __name__ == "__main__":
    common.run(main)
