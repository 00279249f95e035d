"""Dense vs strided vs fixed attention in a small LM on the default corpus, at equal steps.

Sequences are long (2048 bytes) and the model narrow, so attention is a large
share of a step and the patterns' costs differ; every layer uses the point's
pattern (l = 64 ~ sqrt(2048), c = 8, heads interleaved as in the paper).

Variants:
  default   ~0.8M params, 200 steps of 2 x 2048 tokens (three points: ~30 min on 2 loaded cores)
  runlocal  tiny, 10 steps of 2 x 256 tokens (seconds per point)

Run:
  python -m experiments.sweep --config=experiments/configs/sparse_attention.py \
      --workdir=runs/sparse_attention
  python -m experiments.sweep --config=experiments/configs/sparse_attention.py:runlocal \
      --workdir=/tmp/sparse_smoke
"""

from __future__ import annotations

import pathlib

import ml_collections

from experiments.configs import lm

PATTERNS = ("dense", "strided", "fixed")


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
    c = lm.get_config("default")
    c.model.update(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384, max_seq_len=2048)
    c.model.attention.update(pattern="dense", stride=64, summary=8, heads="interleave")
    c.train.update(
        steps=200,
        batch_size=2,
        seq_len=2048,
        warmup_steps=20,
        log_every=10,
        eval_every=100,
        eval_batches=8,
        ckpt_every=100,
    )
    if arg == "runlocal":
        c.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
        c.model.attention.update(stride=16, summary=4)
        c.train.update(
            steps=10, seq_len=256, warmup_steps=2, log_every=5, eval_every=10, eval_batches=2
        )
        c.train.ckpt_every = 10
    elif arg != "default":
        raise ValueError(f"unknown variant '{arg}' of sparse_attention.py; use default or runlocal")
    return c


def get_sweep(arg: str = "default") -> list[dict]:
    del arg
    return [{"name": p, "model.attention.pattern": p} for p in PATTERNS]


def summarize(rows: list[dict], workdir) -> str:
    """Held-out loss and step time per pattern (ratios to dense from this sweep), plus a plot."""
    from mlx_sched import plots

    workdir = pathlib.Path(workdir)
    dense = next((r for r in rows if r["name"] == "dense"), None)
    lines = [
        "| attention | held-out loss (nats/byte) | bits/byte | step time (s, median) "
        "| step time / dense |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["step_time_s"] / dense["step_time_s"] if dense else float("nan")
        lines.append(
            f"| {r['name']} | {r['heldout_loss']:.4f} | {r['heldout_loss'] / 0.693147:.3f} "
            f"| {r['step_time_s']:.2f} | {ratio:.2f} |"
        )
    _plot(rows, workdir, plots)
    return "\n".join(lines) + f"\n\nplot: {workdir / 'sparse_attention.png'}\n"


def _plot(rows, workdir: pathlib.Path, plots) -> None:
    plt = plots.plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for r in rows:
        records = plots.read_jsonl(workdir / r["name"] / "metrics.jsonl")
        train = [(m["step"], m["loss"]) for m in records if m["split"] == "train"]
        held = [(m["step"], m["ce"]) for m in records if m["split"] == "eval"]
        (line,) = axes[0].plot(*zip(*train, strict=True), lw=1.1, label=f"{r['name']} train")
        axes[0].plot(*zip(*held, strict=True), "o", color=line.get_color(), label="held-out")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("nats / byte")
    axes[0].legend(fontsize=7)
    axes[0].grid(alpha=0.3)
    names = [r["name"] for r in rows]
    axes[1].bar(names, [r["step_time_s"] for r in rows], color="gray")
    axes[1].set_ylabel("step time (s, median)")
    fig.tight_layout()
    fig.savefig(workdir / "sparse_attention.png", dpi=80)
    plt.close(fig)
