"""Point runners for sweeps: each takes (config, workdir) and returns a flat dict of results."""

from __future__ import annotations

import pathlib

import numpy as np


def train_point(config, workdir: pathlib.Path) -> dict:
    """Train to the configured steps; report held-out loss, step time and final train metrics."""
    from mlx_sched import plots, training

    trainer, _, eval_loss = training.train_from_config(config, workdir)
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


RUNNERS = {"train": train_point}
