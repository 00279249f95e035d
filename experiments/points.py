"""Point runners for sweeps: each takes (config, workdir) and returns a flat dict of results."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np


def _train_summary(trainer, eval_loss: float, workdir: pathlib.Path) -> dict:
    """Held-out loss, median step time and the final train record's metrics."""
    from mlx_sched import plots

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
    from mlx_sched import training

    trainer, _, eval_loss = training.train_from_config(config, workdir)
    return _train_summary(trainer, eval_loss, workdir)


def moe_point(config, workdir: pathlib.Path) -> dict:
    """train_point, plus held-out loss as served (dropless; EC through its causal fallback)
    and, for tokens-choose routers, at inference capacity factor 0.5 with and without
    batch-priority routing (the V-MoE compute-budget knob)."""
    from mlx_sched import training

    trainer, params, eval_loss = training.train_from_config(config, workdir)
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


RUNNERS = {"train": train_point, "moe": moe_point}
