"""How fast the simulator simulates: the engine (scheduler, policy, postprocess) on a modelled
device, over a fixed heavy trace.

  python -m experiments.bench_simulator                      # slice lengths 1, 8 and 32
  python -m experiments.bench_simulator --requests=2000 --slice_lens=8 --runs=1
  python -m experiments.bench_simulator --cost=runs/calibrate_sim/cost_dense.json

The trace: `--requests` ShareGPT-like requests (mean ~250 prompt / ~338 output tokens,
clipped to 2,048) arriving as a Poisson stream at `--rate` per second, well above what the
modelled device serves, so that the batch stays full (`--max_seqs` sequences) and the queue
long: the heavy case. FCFS, token budget 512. The device is the step-time model's prior, or
a `CalibratedCost` saved by experiments.calibrate_sim (`--cost`).

Reported per slice length, best and median of `--runs`: microseconds of wall time per
simulated batch (one batch = one decode iteration or one mixed step, so a slice of S
iterations counts S), per engine step, and per output token; requests simulated per second;
and what that rate means for 1,000,000 requests over 16 instances in 60 s.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import statistics
import time

from absl import flags

from experiments import common

_REQUESTS = flags.DEFINE_integer("requests", 5000, "requests in the trace")
_RATE = flags.DEFINE_float("rate", 100.0, "arrivals per simulated second (Poisson)")
_SLICES = flags.DEFINE_list("slice_lens", ["1", "8", "32"], "slice lengths to simulate")
_MAX_SEQS = flags.DEFINE_integer("max_seqs", 64, "running sequences (the batch)")
_RUNS = flags.DEFINE_integer("runs", 3, "repetitions (best and median are reported)")
_COST = flags.DEFINE_string("cost", "", "a CalibratedCost JSON (default: the prior)")
_WORKDIR = flags.DEFINE_string("workdir", "", "where bench_simulator.json goes (optional)")
_PROFILE = flags.DEFINE_bool("profile", False, "print the top functions of one run (cProfile)")
_BASELINE = flags.DEFINE_string(
    "baseline", "", "another checkout of the repository (e.g. `git archive` of an older "
    "commit) to time on the same trace, prior device only; its simulation must agree"
)  # fmt: skip

TARGET_REQUESTS, TARGET_INSTANCES, TARGET_S = 1_000_000, 16, 60.0
VIDUR_US_PER_BATCH = (140.0, 170.0)  # Vidur on this machine (the figure)


def heavy_trace(n: int, rate: float, seed: int = 0):
    from mlx_sched.lab import workload

    return workload.synthetic_trace(n, rate, "sharegpt", max_total=2048, seed=seed)


# the baseline's run, in its own interpreter and tree, through the API that has not changed
BASELINE_SCRIPT = """
import json, sys, time
from mlx_sched.lab import workload
from mlx_sched.lab.replay import replay
from mlx_sched.lab.simulator import SimClock, SimModel, SimRunner
from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.engine import Engine
from models import ModelConfig
n, rate, S, max_seqs, runs = json.loads(sys.argv[1])
trace = workload.synthetic_trace(n, rate, "sharegpt", max_total=2048, seed=0)
mc = ModelConfig(max_seq_len=2048)
cfg = ServeConfig(page_size=16, num_pages=max_seqs * 2048 // 16 + 1, max_seqs=max_seqs,
                  token_budget=512, slice_len=S)
walls = []
for _ in range(runs):
    clock = SimClock()
    engine = Engine(SimModel(mc), cfg, runner=SimRunner(mc, cfg, clock), clock=clock)
    t0 = time.perf_counter()
    simulated = replay(engine, trace)
    walls.append(time.perf_counter() - t0)
print(json.dumps(dict(walls=walls, steps=engine._steps, simulated_s=simulated,
                      output_tokens=engine.totals.output_tokens)))
"""


def baseline_walls(tree: str, n: int, rate: float, S: int, max_seqs: int, runs: int) -> dict:
    """The baseline checkout's wall times (and what it simulated) on the same trace."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": tree, "JAX_PLATFORMS": "cpu"}
    args = json.dumps([n, rate, S, max_seqs, runs])
    out = subprocess.run(
        [sys.executable, "-c", BASELINE_SCRIPT, args],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def simulate_once(trace, slice_len: int, max_seqs: int, cost_path: str) -> dict:
    """One simulation of `trace`; wall time and what was simulated."""
    from mlx_sched.lab.replay import replay
    from mlx_sched.lab.simulator import sim_engine
    from mlx_sched.lab.step_cost import CalibratedCost
    from mlx_sched.serve.config import ServeConfig
    from models import ModelConfig

    model_cfg = ModelConfig(max_seq_len=2048)
    cfg = ServeConfig(
        page_size=16,
        num_pages=max_seqs * 2048 // 16 + 1,
        max_seqs=max_seqs,
        token_budget=512,
        slice_len=slice_len,
    )
    cost = CalibratedCost.load(cost_path) if cost_path else None
    engine = sim_engine(model_cfg, cfg, cost)
    t0 = time.perf_counter()
    simulated_s = replay(engine, trace)
    wall = time.perf_counter() - t0
    runner = engine.runner
    return {
        "wall_s": wall,
        "simulated_s": simulated_s,
        "requests": engine.totals.finished,
        "output_tokens": engine.totals.output_tokens,
        "steps": runner.steps,
        "batches": runner.batches,
    }


def main(argv):
    del argv
    trace = heavy_trace(_REQUESTS.value, _RATE.value)
    results = {}
    print(
        f"heavy trace: {len(trace)} ShareGPT-like requests at {_RATE.value:g}/s, max_seqs "
        f"{_MAX_SEQS.value}, FCFS; device: {_COST.value or 'the StepTimeModel prior'}; "
        f"best / median of {_RUNS.value} runs"
    )
    print(
        "| slice_len | steps | batches | mean batch | us / batch | us / step | us / token "
        "| requests / s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    others = []
    for S in map(int, _SLICES.value):
        with common.CpuMeter() as cpu:
            runs = [
                simulate_once(trace, S, _MAX_SEQS.value, _COST.value) for _ in range(_RUNS.value)
            ]
        others.append(cpu.other_cores)
        walls = [r["wall_s"] for r in runs]
        r = runs[0]
        if any((x["steps"], x["batches"]) != (r["steps"], r["batches"]) for x in runs):
            raise RuntimeError("the simulation is not deterministic: runs differ")
        best, med = min(walls), statistics.median(walls)
        row = {
            **{k: r[k] for k in ("simulated_s", "requests", "output_tokens", "steps", "batches")},
            "wall_s_best": best,
            "wall_s_median": med,
            "us_per_batch": [1e6 * best / r["batches"], 1e6 * med / r["batches"]],
            "us_per_step": [1e6 * best / r["steps"], 1e6 * med / r["steps"]],
            "us_per_token": [1e6 * best / r["output_tokens"], 1e6 * med / r["output_tokens"]],
            "requests_per_s": [r["requests"] / best, r["requests"] / med],
            "mean_batch": r["output_tokens"] / r["batches"],
        }
        results[S] = row
        print(
            f"| {S} | {r['steps']} | {r['batches']} | {row['mean_batch']:.1f} | "
            + " | ".join(
                f"{row[k][0]:.1f} / {row[k][1]:.1f}"
                for k in ("us_per_batch", "us_per_step", "us_per_token")
            )
            + f" | {row['requests_per_s'][0]:.0f} / {row['requests_per_s'][1]:.0f} |"
        )
    print(
        f"other processes used {max(others):.2f} CPU cores at most while it ran (of "
        f"{os.cpu_count()}); the simulation itself runs on one\n"
    )
    lo, hi = VIDUR_US_PER_BATCH
    need_one = TARGET_REQUESTS / TARGET_S
    need_each = need_one / TARGET_INSTANCES
    for S, row in results.items():
        us = row["us_per_batch"][0]
        rps = row["requests_per_s"][1]
        print(
            f"slice_len={S}: {us:.1f} us per simulated batch = {lo / us:.1f}-{hi / us:.1f}x "
            f"Vidur's speed ({lo:.0f}-{hi:.0f} us; target >= 10x: "
            f"{'met' if lo / us >= 10 else 'NOT met'}); {rps:.0f} requests/s (median run): "
            f"1M requests take {TARGET_REQUESTS / rps:.0f} s in one process, "
            f"{TARGET_REQUESTS / rps / TARGET_INSTANCES:.0f} s as {TARGET_INSTANCES} parallel "
            f"instances of {TARGET_REQUESTS // TARGET_INSTANCES:,} (60 s needs {need_one:,.0f} "
            f"req/s in one process, {need_each:,.0f} per instance in parallel)"
        )
    if _BASELINE.value:
        if _COST.value:
            raise common.ConfigError("--baseline times the prior device only: drop --cost")
        print(f"\nthe same trace on the baseline {_BASELINE.value} (median of {_RUNS.value}):")
        for S, row in results.items():
            base = baseline_walls(
                _BASELINE.value, _REQUESTS.value, _RATE.value, S, _MAX_SEQS.value, _RUNS.value
            )
            same = base["steps"] == row["steps"] and base["output_tokens"] == row["output_tokens"]
            same = same and abs(base["simulated_s"] - row["simulated_s"]) < 1e-6
            med = statistics.median(base["walls"])
            row["baseline"] = {**base, "speedup": med / row["wall_s_median"], "same": same}
            print(
                f"slice_len={S}: baseline {1e6 * med / row['batches']:.1f} us per batch, this "
                f"tree {row['us_per_batch'][1]:.1f}: {med / row['wall_s_median']:.2f}x faster; "
                f"the same simulation (steps, simulated seconds, tokens): "
                f"{'yes' if same else 'NO'}"
            )
    if _PROFILE.value:
        import cProfile
        import pstats

        S = int(_SLICES.value[0])
        prof = cProfile.Profile()
        prof.runcall(simulate_once, trace, S, _MAX_SEQS.value, _COST.value)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    if _WORKDIR.value:
        workdir = common.require_workdir(_WORKDIR.value)
        path = pathlib.Path(workdir) / "bench_simulator.json"
        path.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
        logging.info("wrote %s", path)


if __name__ == "__main__":
    common.run(main)
