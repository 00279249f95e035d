"""A training run's metrics.jsonl: reading it, the loss plot (matplotlib, Agg, PNG) and the
router summary the main job prints."""

from __future__ import annotations

import json
import pathlib

from mlx_sched.plotting import plt


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


def router_summary(metrics_path: str | pathlib.Path) -> list[str]:
    """One line per MoE layer from the last logged training step (empty for dense models)."""
    train = [r for r in read_jsonl(metrics_path) if r.get("split") == "train"]
    if not train:
        return []
    last = train[-1]
    layers = sorted({k.split("/")[0] for k in last if k.startswith("layer_") and "/" in k})
    lines = []
    for layer in layers:
        g = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith(layer + "/")}
        lines.append(
            f"router {layer} (step {last['step']}): dropped {100 * g.get('dropped', 0):.1f}%, "
            f"load max/mean {g.get('load_imbalance', float('nan')):.2f}, "
            f"entropy {g.get('router_entropy', float('nan')):.2f}, "
            f"tokens per expert {[int(t) for t in g.get('tokens_per_expert', [])]}"
        )
    return lines
