"""Dense vs strided vs fixed attention in a small LM on the default corpus, at equal steps.

Sequences are long (2048 bytes) and the model narrow, so attention is a large
share of a step and the patterns' costs differ; every layer uses the point's
pattern (l = 64 ~ sqrt(2048), c = 8, heads interleaved as in the paper).

Variants:
  default   ~0.8M params, 200 steps of 2 x 2048 tokens; 3 patterns x 2 seeds (~35 min, 2 cores)
  runlocal  tiny, 10 steps of 2 x 256 tokens, one seed (seconds per point)

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


SEEDS = (0, 1)  # init and data order; the second seed measures run-to-run spread


def get_sweep(arg: str = "default") -> list[dict]:
    seeds = SEEDS if arg == "default" else SEEDS[:1]
    return [
        {"name": p + (f"_seed{s}" if s else ""), "model.attention.pattern": p, "train.seed": s}
        for s in seeds
        for p in PATTERNS
    ]


def summarize(rows: list[dict], workdir) -> str:
    """Held-out loss and step time per point and per pattern (mean over seeds), plus a plot."""
    import numpy as np

    from mlx_sched.train import plots

    workdir = pathlib.Path(workdir)
    lines = [
        "| point | attention | seed | held-out loss (nats/byte) | bits/byte "
        "| step time (s, median) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        loss = r["heldout_loss"]
        lines.append(
            f"| {r['name']} | {r['model.attention.pattern']} | {r.get('train.seed', 0)} "
            f"| {loss:.4f} | {loss / np.log(2):.3f} | {r['step_time_s']:.2f} |"
        )
    per = {p: [r for r in rows if r["model.attention.pattern"] == p] for p in PATTERNS}
    per = {p: rs for p, rs in per.items() if rs}
    dense_time = np.mean([r["step_time_s"] for r in per["dense"]]) if "dense" in per else np.nan
    lines += [
        "",
        "| attention | seeds | held-out loss, mean (spread) | step time (s) | step time / dense |",
        "|---|---|---|---|---|",
    ]
    for p, rs in per.items():
        losses, times = [r["heldout_loss"] for r in rs], [r["step_time_s"] for r in rs]
        lines.append(
            f"| {p} | {len(rs)} | {np.mean(losses):.4f} ({np.ptp(losses):.4f}) "
            f"| {np.mean(times):.2f} | {np.mean(times) / dense_time:.2f} |"
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
        (line,) = axes[0].plot(*zip(*train, strict=True), lw=1.1, label=r["name"])
        axes[0].plot(*zip(*held, strict=True), "o", color=line.get_color())
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("nats / byte (lines: train, dots: held-out)", fontsize=8)
    axes[0].legend(fontsize=7)
    axes[0].grid(alpha=0.3)
    names = [r["name"].replace("_seed", "\ns") for r in rows]
    axes[1].bar(names, [r["step_time_s"] for r in rows], color="gray")
    axes[1].tick_params(axis="x", labelsize=7)
    axes[1].set_ylabel("step time (s, median)")
    fig.tight_layout()
    fig.savefig(workdir / "sparse_attention.png", dpi=80)
    plt.close(fig)
