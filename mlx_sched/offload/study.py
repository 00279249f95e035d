"""The offload experiment's work (experiments/offload.py): throughput of offloaded batch generation
against the device budget, the cost model's prediction beside each measurement.

For each cap, from "everything fits" down to "the least any placement needs" (every layer's
weights and KV streamed, one layer computing while the next one arrives), the search picks a
placement; generate runs it (one warm-up, then `runs` timed runs, the fastest kept) and checks
its tokens against the all-device run's. Throughput is generated tokens (every row) per second.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
from flax import nnx

from mlx_sched.offload import cost, tiers
from mlx_sched.offload.generate import generate
from models.config import ModelConfig
from models.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    model: ModelConfig
    batch: int
    prompt_len: int
    max_tokens: int
    cap_fractions: tuple[float, ...]  # of the way from the least placement's bytes to all-device
    runs: int = 2
    seed: int = 0

    def __post_init__(self):
        if not all(0.0 <= f <= 1.0 for f in self.cap_fractions):
            raise tiers.BudgetError(f"cap_fractions must be in [0, 1], got {self.cap_fractions}")


def _row(pred: cost.Prediction, gen, cap: int, fraction: float, batch: int) -> dict:
    steps = len(gen.step_s)
    meas_layer = gen.layer_s.mean(axis=0)  # per layer, over the decode steps
    pred_layer = np.array(pred.layer_s)
    meas_token = float(np.mean(gen.step_s))
    meas_total = gen.prefill_s + sum(gen.step_s)
    return dict(
        cap_fraction=fraction,
        cap_mib=cap / 2**20,
        placement=pred.placement.describe(),
        weights_on_device=sum(pred.placement.weights_on_device),
        kv_on_device=sum(pred.placement.kv_on_device),
        peak_mib=gen.peak_bytes / 2**20,
        tok_s=batch * (steps + 1) / meas_total,
        pred_tok_s=batch * (steps + 1) / pred.total_s,
        token_ms=1e3 * meas_token,
        pred_token_ms=1e3 * pred.token_s,
        token_err=(pred.token_s - meas_token) / meas_token,
        prefill_ms=1e3 * gen.prefill_s,
        pred_prefill_ms=1e3 * pred.prefill_s,
        layer_ms=(1e3 * meas_layer).tolist(),
        pred_layer_ms=(1e3 * pred_layer).tolist(),
        layer_err_mean_abs=float(np.mean(np.abs(pred_layer - meas_layer) / meas_layer)),
    )


def run(c: StudyConfig, log=print) -> dict:
    cfg = c.model
    model = Transformer(cfg, nnx.Rngs(c.seed))
    rng = np.random.default_rng(c.seed)
    prompts = [
        list(map(int, rng.integers(0, cfg.vocab_size, c.prompt_len))) for _ in range(c.batch)
    ]
    hw = cost.calibrate(model, c.batch, c.prompt_len, c.max_tokens)
    log(f"calibrated: {hw}")
    B, Lp, G, N = c.batch, c.prompt_len, c.max_tokens, cfg.n_layers
    full = cost.predict(cfg, hw, tiers.Placement.first(N, N, N), B, Lp, G).required_bytes
    least = cost.predict(cfg, hw, tiers.Placement.first(N, 0, 0), B, Lp, G).required_bytes
    weights = tiers.head_bytes(cfg) + sum(tiers.layer_bytes(cfg, i) for i in range(N))
    rows, reference = [], None
    for f in sorted(c.cap_fractions, reverse=True):
        cap = least + int(f * (full - least))
        pred = cost.search(cfg, hw, B, Lp, G, cap)
        generate(model, prompts, G, pred.placement, cap)  # warm-up: compiles, first touches
        gens = [generate(model, prompts, G, pred.placement, cap) for _ in range(c.runs)]
        gen = min(gens, key=lambda g: g.prefill_s + sum(g.step_s))
        reference = reference or gen.tokens
        row = _row(pred, gen, cap, f, B)
        row["tokens_equal_all_device"] = gen.tokens == reference
        rows.append(row)
        log(
            f"cap {row['cap_mib']:.1f} MiB: {row['placement']}: {row['tok_s']:.0f} tok/s "
            f"(predicted {row['pred_tok_s']:.0f})"
        )
    return dict(
        hardware=dataclasses.asdict(hw),
        model=cfg.to_json_dict(),
        batch=B,
        prompt_len=Lp,
        max_tokens=G,
        weights_mib=weights / 2**20,
        all_device_mib=full / 2**20,
        least_mib=least / 2**20,
        rows=rows,
    )


def table(res: dict) -> str:
    head = (
        "| cap MiB | placement (on device) | peak MiB | tok/s | predicted | ms/token | predicted "
        "| error | per-layer error | tokens == all-device |\n" + "|---" * 10 + "|"
    )
    lines = [head]
    for r in res["rows"]:
        lines.append(
            f"| {r['cap_mib']:.1f} | weights {r['weights_on_device']}, KV {r['kv_on_device']} "
            f"| {r['peak_mib']:.1f} | {r['tok_s']:.0f} | {r['pred_tok_s']:.0f} "
            f"| {r['token_ms']:.1f} | {r['pred_token_ms']:.1f} | {100 * r['token_err']:+.0f}% "
            f"| {100 * r['layer_err_mean_abs']:.0f}% | {r['tokens_equal_all_device']} |"
        )
    return "\n".join(lines)


def plot(res: dict, path: pathlib.Path) -> None:
    from mlx_sched.plotting import plt

    rows = res["rows"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    caps = [r["cap_mib"] for r in rows]
    a.plot(caps, [r["tok_s"] for r in rows], "o-", label="measured")
    a.plot(caps, [r["pred_tok_s"] for r in rows], "s--", label="cost model")
    a.axvline(res["weights_mib"], color="grey", lw=0.8, ls=":", label="model weights")
    a.set(xlabel="device budget (MiB)", ylabel="generated tokens/s", title="offloaded generate")
    a.legend()
    for r in rows:
        b.scatter(r["pred_layer_ms"], r["layer_ms"], s=12, label=f"{r['cap_mib']:.0f} MiB")
    top = max(max(r["layer_ms"] + r["pred_layer_ms"]) for r in rows) * 1.1
    b.plot([0, top], [0, top], "k:", lw=0.8)
    b.set(xlabel="predicted ms per layer (decode)", ylabel="measured ms per layer")
    b.set(title="cost model per layer", xlim=(0, top), ylim=(0, top))
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
