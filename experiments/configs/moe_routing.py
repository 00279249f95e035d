"""MoE routing on the embedded corpus: Switch, GShard top-2, Expert Choice and Switch + BPR.

Every other layer of a small byte-level decoder is an MoE layer of 8 SwiGLU
experts, each the size of the dense model's MLP, so a top-1 MoE has the
active FLOPs of the dense baseline (top-2 has twice its expert FLOPs).

Variants:
  default   4 layers, d_model 128, 8 experts, 300 steps of 8 x 128 tokens (~2 min a point)
  runlocal  a tiny model for smoke tests (seconds)
  long      default trained 1000 steps; its sweep is dense vs Switch (cf 1.25), two seeds each

Run:
  python -m experiments.train --config=experiments/configs/moe_routing.py:runlocal --workdir=/tmp/x
  python -m experiments.sweep --config=experiments/configs/moe_routing.py --workdir=runs/moe_routing
  python -m experiments.sweep --config=experiments/configs/moe_routing.py:long \
      --workdir=runs/moe_routing_long
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.train \\
      --config=experiments/configs/moe_routing.py --workdir=/tmp/ep --config.mesh.expert=4
"""

import dataclasses
import pathlib

import ml_collections

from experiments.configs import lm
from models.moe_config import MoEConfig

ROUTERS = {
    "switch": dict(router="top_k", top_k=1, gates="softmax"),
    "gshard_top2": dict(router="top_k", top_k=2, gates="topk_softmax", second_policy="random"),
    "expert_choice": dict(router="expert_choice", top_k=1, aux_loss_coef=0.0),
    "switch_bpr": dict(router="top_k", top_k=1, gates="softmax", batch_priority=True),
}
CAPACITY_FACTORS = (0.5, 1.0, 1.25, 2.0)


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
    c = lm.get_config("default")
    c.model.update(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=256)
    moe = MoEConfig(num_experts=8, capacity_factor=1.25, jitter=0.01, every=2, offset=1)
    c.model.moe = lm.optional(dataclasses.asdict(moe))
    c.train.update(
        steps=300,
        batch_size=8,
        seq_len=128,
        log_every=20,
        eval_every=150,
        eval_batches=16,
        ckpt_every=300,
        keep=1,
    )
    c.train.warmup_steps = c.train.get_ref("steps") * 2 // 15  # 40 of 300; follows train.steps
    c.kind = "moe"
    if arg == "runlocal":
        c.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
        c.model.moe.update(num_experts=4)
        c.train.update(
            steps=20,
            batch_size=8,
            seq_len=64,
            log_every=5,
            eval_every=10,
            eval_batches=2,
            ckpt_every=10,
            keep=3,
        )
        c.sample.max_tokens = 40
    elif arg == "long":
        c.train.update(steps=1000, warmup_steps=100, eval_every=500, ckpt_every=500)
    elif arg != "default":
        raise ValueError(
            f"unknown variant '{arg}' of moe_routing.py; choose default, runlocal or long"
        )
    return c


def get_sweep(arg: str = "default") -> list[dict]:
    """router x capacity factor; a dense baseline of equal active FLOPs (two seeds, to show the
    seed-to-seed noise); Switch without the aux loss. Variant "long": dense vs Switch only."""
    if arg == "long":
        switch = {f"model.moe.{k}": v for k, v in ROUTERS["switch"].items()}
        return [
            {"name": f"{name}_seed{seed}", "train.seed": seed, **fields}
            for name, fields in (
                ("dense", {"model.moe": None}),
                ("switch_cf1.25", {"model.moe.capacity_factor": 1.25, **switch}),
            )
            for seed in (0, 1)
        ]
    points = []
    for router, fields in ROUTERS.items():
        for cf in CAPACITY_FACTORS:
            point = {"name": f"{router}_cf{cf:g}", "model.moe.capacity_factor": cf}
            point.update({f"model.moe.{k}": v for k, v in fields.items()})
            points.append(point)
    points.append({"name": "dense", "model.moe": None})
    points.append({"name": "dense_seed1", "model.moe": None, "train.seed": 1})  # noise floor
    noaux = {f"model.moe.{k}": v for k, v in ROUTERS["switch"].items()}
    points.append(
        {
            "name": "switch_noaux_cf1",
            "model.moe.capacity_factor": 1.0,
            "model.moe.aux_loss_coef": 0.0,
            **noaux,
        }
    )
    return points


# ---------------------------------------------------------------------------
# Summary: table and plots
# ---------------------------------------------------------------------------

COLUMNS = [
    ("name", "point"),
    ("heldout_loss", "held-out loss (eval routing)"),
    ("heldout_serve", "held-out loss (served, dropless)"),
    ("heldout_cf0.5_bpr", "held-out at cf 0.5, BPR"),
    ("heldout_cf0.5_nobpr", "held-out at cf 0.5, no BPR"),
    ("dropped", "train drop rate"),
    ("load_imbalance", "load max/mean"),
    ("aux_loss", "aux loss"),
    ("step_time_s", "step time (s)"),
]


def _layer_mean(row: dict, name: str):
    vals = [v for k, v in row.items() if k.startswith("final_layer_") and k.endswith("/" + name)]
    return sum(vals) / len(vals) if vals else None


def summarize(rows: list[dict], workdir) -> str:
    """Markdown table (one row per point) and a plot, moe_routing.png, against capacity factor."""
    table = []
    for r in rows:
        t = {k: r.get(k) for k, _ in COLUMNS}
        for name in ("dropped", "load_imbalance", "aux_loss"):
            t[name] = _layer_mean(r, name)
        table.append(t)
    _plots(table, pathlib.Path(workdir))
    fmt = lambda v: "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(label for _, label in COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
    lines += ["| " + " | ".join(fmt(t[k]) for k, _ in COLUMNS) + " |" for t in table]
    return (
        "\n".join(lines)
        + "\n"
        + "\nplot: moe_routing.png (held-out loss, drop rate, load imbalance vs cf)\n"
    )


def _plots(table: list[dict], workdir: pathlib.Path) -> None:
    from mlx_sched.plotting import plt

    by_name = {t["name"]: t for t in table}
    panels = [
        ("heldout_loss", "held-out cross-entropy (nats/byte)"),
        ("dropped", "tokens dropped (train, final)"),
        ("load_imbalance", "expert load max/mean (train, final)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 4))
    for router in ROUTERS:
        pts = [(cf, by_name.get(f"{router}_cf{cf:g}")) for cf in CAPACITY_FACTORS]
        pts = [(cf, t) for cf, t in pts if t is not None]
        for ax, (key, _) in zip(axes, panels, strict=True):
            if pts:
                ax.plot([cf for cf, _ in pts], [t[key] for _, t in pts], "o-", label=router)
    for name, ls in (("dense", "--"), ("dense_seed1", ":")):
        if name in by_name:
            axes[0].axhline(by_name[name]["heldout_loss"], color="k", ls=ls, label=name)
    for ax, (_, label) in zip(axes, panels, strict=True):
        ax.set_xlabel("capacity factor")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(workdir / "moe_routing.png", dpi=80)
    plt.close(fig)
