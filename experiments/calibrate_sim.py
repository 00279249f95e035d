"""Calibrate the simulator on the real engine and report its error on traces it was not fitted on.

  python -m experiments.calibrate_sim --workdir=runs/calibrate_sim
  python -m experiments.calibrate_sim --config=experiments/configs/calibrate_sim.py:runlocal \
      --workdir=/tmp/cal
  python -m experiments.calibrate_sim --workdir=runs/cal8 --config.repeats=8   # tighter
  python -m experiments.calibrate_sim --workdir=runs/cal --config.save_runs=True
  python -m experiments.calibrate_sim --workdir=runs/refit --config.runs_from=runs/cal
      # refit and simulate a saved session's real runs (no measuring): for cost-model work

Per model of the config (a dense one and an MoE one), on one warmed-up device runner:

1. the real engine serves every trace, fit and held-out ones, `repeats` times, in rounds
   (online, real time; a fresh engine per run); a run during which other processes used
   more than `max_other_cores` CPU cores (/proc/stat) is measured again, up to `retries`
   times (a CI job starting next to it makes steps twice as slow), and left out if it
   stays disturbed (while its trace has another run);
2. a `CalibratedCost` is fitted to the fit traces' step records (per compiled shape: device
   time, host time before and after the device, the gap between steps, the idle wake-up,
   and with `sim.noise` the machine's speed drift and the steps' spread);
3. the simulator serves every trace with it (`sim.seeds` seeds when noisy), and mean / P90
   TTFT and TPOT, averaged over the runs, are compared with the real engine's.

Targets, on the held-out traces: mean within 5%, P90 within 10%. A miss is printed as one;
the targets are not changed. Beside each measured figure: how much the real runs of that
trace differed among themselves (on a shared 2-core machine, often more than the targets),
and per run the machine's speed (measured / fitted time of the run's own steps). A
mechanics check replays each trace's first real run with its own measured step times:
the simulator should then step as the engine did.

Writes calibrate_sim.json (per model: the fitted cost, its residuals, per trace the real
runs' and simulations' summaries, errors, speeds) and cost_<model>.json (the fitted cost,
for `CalibratedCost.load`, e.g. `bench_simulator --cost=`) to --workdir; with
`--config.save_runs` also runs_<model>.pkl: every real run's (summary, step records,
arrival times, other processes' cores, add times) per trace, to refit offline.
"""

from __future__ import annotations

import gc
import logging
import pathlib
import pickle
import types

from absl import flags
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file(
    "config", common.config_path("calibrate_sim"), "calibration config", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/calibrate_sim", "where the JSON goes")

SUMMARY_KEYS = ("requests", "finished", "wall_s", "steps", "decode_steps", "ttft", "tpot")


def make_trace(spec, model_cfg):
    from mlx_sched.lab import workload

    return workload.synthetic_trace(
        n=spec.num_requests,
        rate=spec.rate or None,
        preset=spec.preset,
        max_total=model_cfg.max_seq_len,
        length_scale=spec.length_scale,
        cv=spec.cv,
        vocab=min(256, model_cfg.vocab_size),
        seed=spec.seed,
    )


def serve_real(model, serve_cfg, trace, runner):
    """(summary, step records, absolute arrival times, other processes' CPU cores, times the
    requests were added at) of the real engine on `trace`: a fresh engine on the model's
    warmed-up device runner."""
    from mlx_sched.lab.replay import replay
    from mlx_sched.serve.engine import Engine

    engine = Engine(model, serve_cfg, runner=runner, warmup=False)
    added, add = [], engine.add_request

    def add_timed(*args, **kwargs):  # where the loop looked for arrivals (the replay check)
        added.append(engine.clock())
        return add(*args, **kwargs)

    engine.add_request = add_timed
    gc.collect()  # not the previous run's garbage, collected during this one
    with common.CpuMeter() as cpu:
        wall = replay(engine, trace)
    arrivals = [r.arrival for r in engine.requests.values()]
    return engine.summary(wall), engine.step_records, arrivals, cpu.other_cores, added


def serve_sim(model_cfg, serve_cfg, trace, cost):
    """(summary, step records) of the simulator with `cost` on `trace`."""
    from mlx_sched.lab.replay import replay
    from mlx_sched.lab.simulator import sim_engine

    engine = sim_engine(model_cfg, serve_cfg, cost)
    return engine.summary(replay(engine, trace)), engine.step_records


def serve_sims(model_cfg, serve_cfg, trace, cost, seeds: int):
    """The simulator's summaries with `cost`'s noise drawn from `seeds` seeds (one when it
    has none): a noisy simulation's statistics are averaged like the real runs'."""
    from mlx_sched.lab.step_cost import CalibratedCost

    out = []
    for seed in range(seeds if cost.noise else 1):
        seeded = CalibratedCost.from_dict({**cost.to_dict(), "seed": cost.seed + seed})
        out.append(serve_sim(model_cfg, serve_cfg, trace, seeded)[0])
    return out


def measure(name, model_cfg, serve_cfg, specs, traces, config) -> dict:
    """Per trace, `repeats` real runs (`serve_real`), in rounds on one warmed-up runner."""
    from flax import nnx

    from mlx_sched.serve.runner import Runner
    from models import Transformer

    model = Transformer(model_cfg, nnx.Rngs(0))
    runner = Runner(model, serve_cfg)
    logging.info("%s: warm-up compiled %d shapes", name, runner.warmup())
    runs, retried = {s.name: [] for s in specs}, 0
    # the fit's runs and the held-out ones alternate, so that a drift of the machine's
    # speed over the session reaches both alike; each round starts one trace later, so
    # that no trace always follows the same one
    for rep in range(config.repeats):
        k = rep % len(specs)
        for spec in specs[k:] + specs[:k]:
            logging.info("%s: real engine on %s (run %d)", name, spec.name, rep + 1)
            tries = []
            while len(tries) <= config.retries:  # again while other processes were busy
                tries.append(serve_real(model, serve_cfg, traces[spec.name], runner))
                if tries[-1][3] <= config.max_other_cores:
                    break
                logging.warning(
                    "%s on %s: other processes used %.2f CPU cores; measuring again",
                    name, spec.name, tries[-1][3],
                )  # fmt: skip
            retried += len(tries) - 1
            runs[spec.name].append(min(tries, key=lambda run: run[3]))
    return {**runs, "_retried": retried}


def load_runs(folder: str, name: str, specs) -> dict:
    """A saved session's real runs of model `name` (runs_<name>.pkl), for the config's traces."""
    path = pathlib.Path(folder) / f"runs_{name}.pkl"
    if not path.is_file():
        raise common.ConfigError(f"runs_from: {path} does not exist (save it with save_runs)")
    with open(path, "rb") as f:
        saved = pickle.load(f)
    missing = [s.name for s in specs if s.name not in saved]
    if missing:
        raise common.ConfigError(f"runs_from: {path} has no runs of the traces {missing}")
    # older files lack the last fields: other processes' cores (0) and the add times (none)
    pad = (0.0, ())
    return {s.name: [(*run, *pad[len(run) - 3 :]) for run in saved[s.name]] for s in specs}


def main(argv):
    del argv
    from mlx_sched.lab import calibrate, step_cost
    from mlx_sched.serve import metrics
    from mlx_sched.serve.config import ServeConfig
    from mlx_sched.train.loop import model_config

    config = _CONFIG.value
    workdir = common.claim_workdir(_WORKDIR.value)
    serve_cfg = ServeConfig.from_dict(config.serve.to_dict())
    fit_traces = [types.SimpleNamespace(**t) for t in config.fit_traces]
    eval_traces = [types.SimpleNamespace(**t) for t in config.eval_traces]
    specs = [*fit_traces, *eval_traces]
    if len({s.name for s in specs}) < len(specs):
        raise common.ConfigError("calibrate_sim: two traces share a name")
    if config.repeats < 1:
        raise common.ConfigError(f"calibrate_sim: repeats must be >= 1, got {config.repeats}")
    out, results, loads, other, retried, dropped, kept_busy = {}, [], [], [], 0, 0, 0
    most_runs = 0
    for name, section in config.models.items():
        model_cfg = model_config(section)
        traces = {s.name: make_trace(s, model_cfg) for s in specs}
        if config.runs_from:  # a session saved with save_runs: refit and simulate, no measuring
            runs = load_runs(config.runs_from, name, specs)
        else:
            runs = measure(name, model_cfg, serve_cfg, specs, traces, config)
        retried += runs.pop("_retried", 0)
        most_runs = max(most_runs, *(len(v) for v in runs.values()))
        other += [run[3] for v in runs.values() for run in v]
        if config.save_runs and not config.runs_from:  # every real run, to refit offline
            with open(workdir / f"runs_{name}.pkl", "wb") as f:
                pickle.dump(runs, f)
        # runs that other processes still disturbed measured another machine: left out of the
        # fit and the averages (while a trace has an undisturbed one)
        for spec in specs:
            calm = [run for run in runs[spec.name] if run[3] <= config.max_other_cores]
            dropped += len(runs[spec.name]) - len(calm) if calm else 0
            kept_busy += 0 if calm else len(runs[spec.name])
            runs[spec.name] = calm or runs[spec.name]
        fit_runs = [run[1] for s in fit_traces for run in runs[s.name]]
        fit_arrivals = [run[2] for s in fit_traces for run in runs[s.name]]
        cost = calibrate.fit_cost(
            fit_runs,
            fit_arrivals,
            min_count=config.sim.min_count,
            noise=config.sim.noise,
            seed=config.sim.seed,
        )
        cost.save(workdir / f"cost_{name}.json")
        fit_shapes = {(r.kind, tuple(r.shape)) for run in fit_runs for r in run}
        model_out = {
            "cost": cost.to_dict(),
            "residuals_on_fit": calibrate.residuals(cost, [r for run in fit_runs for r in run]),
            "traces": {},
        }
        for spec in specs:
            held_out = spec in eval_traces
            real_runs = runs[spec.name]
            real = calibrate.mean_summary([run[0] for run in real_runs])
            sims = serve_sims(model_cfg, serve_cfg, traces[spec.name], cost, config.sim.seeds)
            sim = calibrate.mean_summary(sims)
            rows = calibrate.compare(real, sim)
            # the mechanics check: the first run's own step times, replayed
            summary, recs, arrivals, _, added = real_runs[0]
            replayed, sim_recs = serve_sim(
                model_cfg,
                serve_cfg,
                traces[spec.name],
                step_cost.RecordedCost(recs, arrivals, cost, added),
            )
            same = calibrate.same_steps(recs, sim_recs)
            replay_rows = calibrate.compare(summary, replayed)
            shapes = {(r.kind, tuple(r.shape)) for run in real_runs for r in run[1]}
            load = {
                "model": name,
                "trace": spec.name,
                "speed": [calibrate.step_time_ratio(cost, run[1]) for run in real_runs],
                "speed_mixed": [
                    calibrate.step_time_ratio(cost, run[1], "mixed") for run in real_runs
                ],
                "speed_decode": [
                    calibrate.step_time_ratio(cost, run[1], "decode") for run in real_runs
                ],
                "replay_same_steps": f"{same}/{len(recs)}",
                "replay_error": max(abs(r["error"]) for r in replay_rows),
            }
            loads.append(load)
            model_out["traces"][spec.name] = {
                "held_out": held_out,
                "spec": vars(spec),
                "real_runs": [{k: run[0][k] for k in SUMMARY_KEYS} for run in real_runs],
                "real": real,
                "sim_runs": [{k: s[k] for k in SUMMARY_KEYS} for s in sims],
                "sim": sim,
                "errors": rows,
                "shapes_not_in_fit": [f"{k}{list(d)}" for k, d in sorted(shapes - fit_shapes)],
                "other_processes_cores": [run[3] for run in real_runs],
                "load": load,
                "recorded_replay_errors": replay_rows,
            }
            label = spec.name if held_out else f"{spec.name} (fitted on)"
            results.append({"model": name, "trace": label, "rows": rows, "held_out": held_out})
        out[name] = model_out
    held = [(res, r) for res in results if res["held_out"] for r in res["rows"]]
    missed = [
        f"{res['model']}/{res['trace']} {r['stat']} {r['metric'].upper()} "
        f"({100 * r['error']:+.1f}%, target {100 * r['target']:.0f}%)"
        for res, r in held
        if not r["ok"]
    ]
    print(
        f"\n== simulator vs real engine: mean and P90 TTFT / TPOT; measured = the mean of "
        f"up to {most_runs} real runs per trace"
    )
    print(calibrate.error_table(results))
    print(f"\nheld-out targets met: {len(held) - len(missed)}/{len(held)}")
    for m in missed:
        print(f"MISSED: {m}")
    print(
        "\n== per trace: the machine's speed during each real run (its steps' measured / fitted "
        "time: all, mixed steps, slices), and the mechanics check (the simulator replaying run 1's "
        "own step times: steps identical, largest latency error)"
    )
    print("| model | trace | measured / fitted | mixed | slices | replay: same steps | error |")
    print("|---|---|---|---|---|---:|---:|")
    for ld in loads:
        speed = [
            " ".join(f"x{v:.2f}" for v in ld[k]) for k in ("speed", "speed_mixed", "speed_decode")
        ]
        print(
            f"| {ld['model']} | {ld['trace']} | {' | '.join(speed)} | {ld['replay_same_steps']} | "
            f"{100 * ld['replay_error']:.2f}% |"
        )
    print()
    for name, model_out in out.items():
        for kind, res in model_out["residuals_on_fit"].items():
            print(
                f"{name} {kind} steps: summed device time {100 * res['device_sum_error']:+.1f}%, "
                f"summed host time {100 * res['host_sum_error']:+.1f}%, one step's device time "
                f"median |error| {100 * res['device_median_abs_error']:.1f}% (fit traces)"
            )
    print(
        f"other processes during the real runs: {max(other):.2f} CPU cores at most, "
        f"{sum(other) / len(other):.2f} on average; {retried} run(s) measured again because "
        f"they used more than {config.max_other_cores:g}, {dropped} still disturbed left out"
        + (
            f", {kept_busy} disturbed kept (their traces had no undisturbed run: the machine "
            "was busy throughout, and the comparison measures a busy machine)"
            if kept_busy
            else ""
        )
    )
    out["summary"] = {
        "held_out_met": len(held) - len(missed),
        "held_out_total": len(held),
        "missed": missed,
        "other_processes_cores_max": max(other),
        "runs_measured_again": retried,
        "disturbed_runs_left_out": dropped,
    }
    metrics.write_json(workdir / "calibrate_sim.json", out)
    print(f"\nJSON in {workdir}: calibrate_sim.json, cost_<model>.json")


if __name__ == "__main__":
    common.run(main)
