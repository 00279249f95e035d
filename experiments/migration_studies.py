"""The studies of experiments/migration.py, without its flags (tests import this module);
the cluster, trace and replay they share are in experiments/migration_serving.py."""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import numpy as np

from experiments import migration_report as report
from experiments.migration_serving import (
    latency,
    make_cluster,
    make_model,
    make_trace,
    paired,
    progress,
    serve_point,
    warm_up,
)

# -- study a: load balancing ------------------------------------------------------------------


def load_balance(config, workdir: pathlib.Path) -> dict:
    """Llumnix dispatch with and without migration on the same traces (order alternated), at
    each arrival rate of `load_balance.rates`."""
    model = make_model(config.model.to_dict())
    warm_up(model, config)
    points = []
    seeds, rates = list(config.load.seeds), list(config.load_balance.rates)
    for rate in rates:
        load = config.load.copy_and_resolve_references()
        load.rate = rate
        runs, pooled = [], {False: [], True: []}
        for i, seed in enumerate(seeds):
            trace = make_trace(load, config.model.vocab_size, seed)
            for migration in (False, True) if i % 2 == 0 else (True, False):
                row, ms = serve_point(model, config, trace, migration=migration)
                runs.append({"seed": seed, "migration": migration, **row})
                pooled[migration] += ms
                n = len(points) * 2 * len(seeds) + len(runs)
                tag = f"load {n}/{2 * len(seeds) * len(rates)} rate={rate:g} seed={seed}"
                progress(f"{tag} migration={'on' if migration else 'off'}", row)
        points.append(
            {
                "rate": rate,
                "runs": runs,
                "pooled": {"off": latency(pooled[False]), "on": latency(pooled[True])},
                "paired": paired(
                    *({r["seed"]: r for r in runs if r["migration"] == on} for on in (False, True))
                ),
                "requests": pooled,  # for the plot; dropped from the JSON
            }
        )
    report.plot_latency(points, workdir / "migration_latency.png")
    return {"points": [{k: v for k, v in p.items() if k != "requests"} for p in points]}


# -- study b: downtime vs context length --------------------------------------------------------


def migrate_once(cluster, prompt, d, dst_of) -> dict:
    """Serve `prompt`, migrate it after `d.decode_before` tokens, step until the move ends."""
    from mlx_sched.serve.request import SamplingParams

    rid = cluster.add_request(prompt, SamplingParams(max_tokens=d.max_tokens, ignore_eos=True))
    req = cluster.requests[rid]
    while len(req.outputs[0]) < d.decode_before:
        cluster.step()
    computed = len(req.prompt) + len(req.outputs[0]) - 1  # the last token has no KV yet
    logged = len(cluster.move_log)
    cluster.migrate(rid, dst_of(req.instance))
    steps = 0
    while len(cluster.move_log) == logged:
        cluster.step()
        steps += 1
    record = cluster.move_log[logged]
    if not req.finished:
        cluster.abort(rid)
    return {
        **record,
        "computed_at_start": computed,
        "decoded_while_moving": record["tokens"] - computed,
        "cluster_steps": steps,
    }


def stop_and_copy_once(cluster, prompt) -> dict:
    """A hand-over of `prompt`'s KV after its prefill: the request is paused while every page
    is copied, so it is stopped for the copy and the resume (`seconds` + `downtime`)."""
    from mlx_sched.serve.request import SamplingParams

    logged = len(cluster.move_log)
    rid = cluster.add_request(prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    while len(cluster.move_log) == logged:
        cluster.step()
    record = cluster.move_log[logged]
    while not cluster.requests[rid].finished:
        cluster.step()
    return {**record, "stopped": record["seconds"] + record["downtime"]}


def downtime(config, workdir: pathlib.Path) -> dict:
    """Forced migrations at each context length, and stop-and-copy moves of the same prompts."""
    d = config.downtime
    model = make_model(d.model.to_dict())
    n = d.num_instances
    base = {**config.cluster.to_dict(), "num_instances": n, "migration": False}
    rng = np.random.default_rng(0)
    vocab = d.model.vocab_size
    prompts = [(L, rng.integers(0, vocab, L).tolist()) for L in d.lengths for _ in range(d.repeats)]
    warm = rng.integers(0, vocab, d.lengths[0]).tolist()
    out = {"migrations": [], "stop_and_copy": []}

    c = make_cluster(model, d.serve.to_dict(), base)
    migrate_once(c, warm, d, lambda i: (i + 1) % n)  # first moves of a process are slower
    for k, (L, prompt) in enumerate(prompts):
        rec = {"length": L, **migrate_once(c, prompt, d, lambda i: (i + 1) % n)}
        out["migrations"].append(rec)
        print(
            f"[downtime {k + 1}/{len(prompts)}] migrate L={L}: {rec['outcome']}, "
            f"{rec['stages']} stages, {rec['bytes'] / 2**20:.2f} MiB, copies "
            f"{1e3 * rec['seconds']:.1f} ms, downtime {1e3 * rec['downtime']:.2f} ms",
            flush=True,
        )
    c.shutdown()

    roles = ("prefill",) + ("decode",) * (n - 1)
    c = make_cluster(model, d.serve.to_dict(), {**base, "roles": roles})
    stop_and_copy_once(c, warm)
    for k, (L, prompt) in enumerate(prompts):
        rec = {"length": L, **stop_and_copy_once(c, prompt)}
        out["stop_and_copy"].append(rec)
        print(
            f"[downtime {k + 1}/{len(prompts)}] stop-and-copy L={L}: {rec['outcome']}, "
            f"{rec['bytes'] / 2**20:.2f} MiB, stopped {1e3 * rec['stopped']:.1f} ms",
            flush=True,
        )
    c.shutdown()
    out["by_length"] = [downtime_row(L, out) for L in d.lengths]
    report.plot_downtime(out["by_length"], workdir / "migration_downtime.png")
    return out


def downtime_row(L: int, out: dict) -> dict:
    done = lambda key: [r for r in out[key] if r["length"] == L and r["outcome"] == "done"]
    mig, sc = done("migrations"), done("stop_and_copy")
    mean = lambda rows, k: float(np.mean([r[k] for r in rows])) if rows else float("nan")
    dts = [r["downtime"] for r in mig] or [float("nan")]
    return {
        "length": L,
        "done": len(mig),
        "aborted": sum(r["length"] == L for r in out["migrations"]) - len(mig),
        "stages": mean(mig, "stages"),
        "mib_copied": mean(mig, "bytes") / 2**20,
        "copy_ms": 1e3 * mean(mig, "seconds"),
        "downtime_ms": 1e3 * float(np.mean(dts)),
        "downtime_min_ms": 1e3 * float(np.min(dts)),
        "downtime_max_ms": 1e3 * float(np.max(dts)),
        "decoded_while_moving": mean(mig, "decoded_while_moving"),
        "stop_and_copy_mib": mean(sc, "bytes") / 2**20,
        "stop_and_copy_ms": 1e3 * mean(sc, "stopped"),
    }


# -- study c: priority headroom ---------------------------------------------------------------


def priority(config, workdir: pathlib.Path) -> dict:
    """Llumnix (migration on) with `headroom_pages` per high-priority request, and without."""
    p = config.priority
    model = make_model(config.model.to_dict())
    if "load_balance" not in config.studies:
        warm_up(model, config)
    arms = {"no_headroom": 0, "headroom": p.headroom_pages}
    runs, pooled = [], {a: [] for a in arms}
    for i, seed in enumerate(p.seeds):
        trace = make_trace(config.load, config.model.vocab_size, seed, p.high_share)
        for arm in list(arms) if i % 2 == 0 else list(arms)[::-1]:
            row, ms = serve_point(
                model,
                config,
                trace,
                {"policy": p.policy, "policy_args": p.policy_args.to_dict()},
                migration=True,
                headroom_pages=arms[arm],
            )
            high = latency([m for m in ms if m["priority"] > 0])
            normal = latency([m for m in ms if m["priority"] <= 0])
            runs.append({"seed": seed, "arm": arm, **row, "high": high, "normal": normal})
            pooled[arm] += ms
            tag = f"priority {len(runs)}/{2 * len(p.seeds)} seed={seed} {arm}, high class"
            progress(tag, {**row, **high})
    report.plot_priority(pooled, workdir / "migration_priority.png")
    by_arm = {a: {r["seed"]: r["high"] for r in runs if r["arm"] == a} for a in arms}
    return {
        "headroom_pages": p.headroom_pages,
        "runs": runs,
        "paired_high": paired(by_arm["no_headroom"], by_arm["headroom"]),
        "pooled": {
            arm: {
                "high": latency([m for m in ms if m["priority"] > 0]),
                "normal": latency([m for m in ms if m["priority"] <= 0]),
            }
            for arm, ms in pooled.items()
        },
    }


STUDIES = {"load_balance": load_balance, "downtime": downtime, "priority": priority}


def load_balance_sim(config, workdir: pathlib.Path) -> dict:
    """The load study in the simulator (`cluster.sim`): the same cluster, dispatch, migration
    and engine code, but the 4 instances run side by side as on devices of their own (the
    real study steps them one after another on one host), with many more traces."""
    del workdir
    from mlx_sched.cluster import ClusterConfig
    from mlx_sched.cluster.sim import SimCluster
    from mlx_sched.serve.config import ServeConfig
    from models import ModelConfig

    s = config.load_balance_sim
    model_cfg = ModelConfig.from_dict(config.model.to_dict())
    serve = ServeConfig.from_dict(config.serve.to_dict())
    out = {"rates": {}}
    for rate in s.rates:
        load = dataclasses.replace(_Load(**config.load.to_dict()), rate=rate)
        arms = {}
        for arm, migrate in (("off", False), ("on", True)):
            per_seed, pooled = {}, []
            for seed in s.seeds:
                cfg = ClusterConfig.from_dict({**config.cluster.to_dict(), "migration": migrate})
                sim = SimCluster(model_cfg, serve, cfg, seed=seed)
                sim.run(make_trace(load, model_cfg.vocab_size, seed))
                ms = [
                    {k: v for k, v in r.metrics().items() if k != "itl"}
                    for r in sim.cluster.requests.values()
                ]
                pooled += ms
                per_seed[seed] = latency(ms) | {
                    "migrations": sum(m["migrations"] for m in ms),
                }
            arms[arm] = {"pooled": latency(pooled), "per_seed": per_seed}
            logging.info(
                "sim load %.0f req/s, migration %s: E2E p99 %.0f ms, preemptions %d",
                rate,
                arm,
                1e3 * arms[arm]["pooled"]["e2e"]["p99"],
                arms[arm]["pooled"]["preemptions"],
            )
        out["rates"][str(rate)] = arms | {
            "paired": paired(arms["off"]["per_seed"], arms["on"]["per_seed"])
        }
    return out


@dataclasses.dataclass
class _Load:
    """`config.load` as attributes (for `make_trace`)."""

    num_requests: int
    rate: float
    cv: float
    preset: str
    length_scale: float
    max_total: int
    seeds: tuple = ()


STUDIES["load_balance_sim"] = load_balance_sim
