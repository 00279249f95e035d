"""Plots written next to metrics (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_jsonl(path: str | pathlib.Path) -> list[dict]:
    path = pathlib.Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_curve(metrics_path: str | pathlib.Path, out_png: str | pathlib.Path) -> None:
    """Train loss and held-out loss against step."""
    records = read_jsonl(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train"]
    held = [(r["step"], r["ce"]) for r in records if r.get("split") == "eval"]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1.2)
    if held:
        ax.plot(*zip(*held, strict=True), "o-", label="held-out cross-entropy", lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("nats / byte")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
