"""Point runners for sweeps: each takes (config, workdir) and returns a flat dict of results."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np


def _train_summary(trainer, eval_loss: float, workdir: pathlib.Path) -> dict:
    """Held-out loss, median step time and the final train record's metrics."""
    from mlx_sched.train import plots

    records = plots.read_jsonl(workdir / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    # the first logged interval includes compilation: leave it out of the timing
    times = [r["step_time_s"] for r in train[1:] if "step_time_s" in r] or [
        r["step_time_s"] for r in train if "step_time_s" in r
    ]
    last = train[-1] if train else {}
    skip = {"step", "split", "lr", "tok_s", "step_time_s"}
    return {
        "heldout_loss": eval_loss,
        "step_time_s": float(np.median(times)) if times else float("nan"),
        "params": trainer.num_params,
        **{f"final_{k}": v for k, v in last.items() if k not in skip},
    }


def train_point(config, workdir: pathlib.Path) -> dict:
    """Train to the configured steps; report held-out loss, step time and final train metrics."""
    from mlx_sched.train import loop

    trainer, _, eval_loss = loop.train_from_config(config, workdir)
    return _train_summary(trainer, eval_loss, workdir)


def moe_point(config, workdir: pathlib.Path) -> dict:
    """train_point, plus held-out loss as served (dropless; EC through its causal fallback)
    and, for tokens-choose routers, at inference capacity factor 0.5 with and without
    batch-priority routing (the V-MoE compute-budget knob)."""
    from mlx_sched.train import loop

    trainer, params, eval_loss = loop.train_from_config(config, workdir)
    out = _train_summary(trainer, eval_loss, workdir)
    moe = trainer.model_cfg.moe
    if moe is None:
        return out
    out["heldout_serve"] = trainer.evaluate(params, mode="serve")
    if moe.router == "top_k":
        for bpr in (True, False):
            budget = dataclasses.replace(moe, eval_capacity_factor=0.5, batch_priority=bpr)
            cfg = dataclasses.replace(trainer.model_cfg, moe=budget)
            key = "heldout_cf0.5_bpr" if bpr else "heldout_cf0.5_nobpr"
            out[key] = trainer.evaluate(params, mode="eval", model_cfg=cfg)
    return out


def serve_point(config, workdir: pathlib.Path) -> dict:
    """Serve the config's workload (real engine or simulator); latency, fairness, SLO results.

    With `workload.offered_load` > 0 the clients' rates are first set to that multiple of the
    engine's capacity measured on this machine (once per sweep: `<sweep>/capacity.json`)."""
    from experiments import serving
    from mlx_sched.lab import plots as serving_plots
    from mlx_sched.lab import slo
    from mlx_sched.serve import metrics

    capacity = None
    if config.workload.get("offered_load", 0):
        capacity = serving.capacity(config, pathlib.Path(workdir).parent / "capacity.json")
        config = serving.at_offered_load(config, capacity)
    engine, trace = serving.engine_and_trace(config)
    summary = serving.run(engine, trace, config, workdir)
    reqs = list(engine.requests.values())
    rms = engine.request_metrics()
    arrivals = [r.arrival for r in trace]
    span = max(arrivals) - min(arrivals)
    out = {
        "policy": engine.cfg.policy,
        "requests": summary["requests"],
        "finished": summary["finished"],
        "wall_s": summary["wall_s"],
        "output_tok_s": summary["output_tok_s"],
        "preemptions": summary["preemptions"],
        "compiles_after_warmup": summary["compiles_after_warmup"],
        # the load this run saw: offered (arrivals) vs served (completions), both measured
        "capacity_req_s": capacity,
        "offered_req_s": (len(trace) - 1) / span if config.workload.online and span else None,
        "served_req_s": summary["finished"] / summary["wall_s"],
        "max_request_cost": max((m["prompt_len"] + 2 * m["output_len"] for m in rms), default=0),
    }
    for key in ("ttft", "tpot", "itl", "e2e", "normalized_latency"):
        for p in ("p50", "p99", "mean"):
            out[f"{key}_{p}"] = summary[key][p]
    e2e = [m["e2e"] for m in rms if "e2e" in m]
    out["e2e_max"] = float(max(e2e)) if e2e else None
    clients = sorted({r.client for r in reqs})
    weights = dict(config.serve.get("policy_args", {}).get("weights", {}))
    served = {c: sum(len(s.output) for r in reqs if r.client == c for s in r.seqs) for c in clients}
    out["served_tokens"] = served
    backlogged = slo.backlogged_service(reqs, weights)
    out["backlogged_service"] = backlogged
    out["jain"] = slo.jain_index(backlogged.values()) if len(clients) > 1 else None
    out["backlogged_share"] = slo.backlogged_share(reqs) if len(clients) > 1 else None
    grid, diff = slo.service_difference(reqs, weights)
    out["max_service_diff"] = float(np.nanmax(diff)) if np.any(~np.isnan(diff)) else 0.0
    if config.get("slo"):
        out["slo_attainment"] = slo.slo_attainment(rms, config.slo.ttft, config.slo.tpot)
    for c in clients:
        mine = [m for m in rms if m["client"] == c and "ttft" in m]
        out[f"ttft_p50_{c}"] = float(np.percentile([m["ttft"] for m in mine], 50)) if mine else None
        out[f"e2e_mean_{c}"] = float(np.mean([m["e2e"] for m in mine])) if mine else None
        gaps = [g for m in mine for g in m.get("itl", [])] + [m["ttft"] for m in mine]
        out[f"stall_max_{c}"] = float(max(gaps)) if gaps else None  # longest wait for a token
    prios = sorted({r.priority for r in reqs})
    for p in prios:
        mine = [m for m in rms if m["priority"] == p and "ttft" in m]
        out[f"ttft_p50_prio{p}"] = float(np.percentile([m["ttft"] for m in mine], 50))
        out[f"ttft_p99_prio{p}"] = float(np.percentile([m["ttft"] for m in mine], 99))
    curves_t, curves = slo.service_curves(reqs, weights)
    (workdir / "service.json").write_text(
        json.dumps(
            {
                "t": curves_t.tolist(),
                "diff": np.nan_to_num(diff).tolist(),
                **{c: v.tolist() for c, v in curves.items()},
            }
        )
    )
    serving_plots.service(curves_t, curves, diff, workdir / "service.png")
    metrics.write_json(workdir / "steps.json", [vars(s) for s in engine.step_records[-5000:]])
    return out


def speculative_point(config, workdir: pathlib.Path) -> dict:
    """One point of the speculative-decoding experiment (`experiments/configs/speculative.py`):
    the cached trained target (and draft), offline batches or a Poisson stream."""
    from experiments import spec_lab
    from mlx_sched.serve.config import ServeConfig
    from mlx_sched.serve.engine import Engine

    p = dict(config.point)
    tiny, models = config.tiny, pathlib.Path(config.models_dir)
    target = spec_lab.load(spec_lab.ensure_model(models, "target", tiny), config.dtype)
    draft = None
    if p["drafter"] in ("small", "medium", "distilled") and p["gamma"]:
        run = spec_lab.ensure_model(models, f"draft_{p['drafter']}", tiny)
        draft = spec_lab.load(run, config.dtype)
    serve = spec_lab.serve_settings(p, p["max_seqs"])
    engine = Engine(target, ServeConfig(**serve), draft_model=draft)
    if p["rate"] > 0:
        prompts = spec_lab.code_prompts(p["requests"], p["prompt_len"], seed=1)
        engine.generate(prompts[:2], None)  # warm the host paths once
        out = spec_lab.online(engine, prompts, p["max_tokens"], p["temperature"], p["rate"],
                              0, config.slo.ttft, config.slo.tpot)  # fmt: skip
    else:
        n = p["batch"] * p["groups"]
        prompts = spec_lab.code_prompts(n, p["prompt_len"], seed=2)
        groups = [prompts[i : i + p["batch"]] for i in range(0, n, p["batch"])]
        out = spec_lab.offline_groups(engine, groups, p["max_tokens"], p["temperature"], p["runs"])
    out.update({k: p[k] for k in ("drafter", "gamma", "tree_width", "adaptive", "batch", "rate")})
    out["compiles_after_warmup"] = engine.runner.compiles_since_warmup
    return out


RUNNERS = {
    "train": train_point,
    "moe": moe_point,
    "serve": serve_point,
    "speculative": speculative_point,
}
