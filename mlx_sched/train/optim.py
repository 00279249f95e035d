"""The training configuration and the optimizer it describes: AdamW, warmup + cosine."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import optax

from models.errors import ConfigError, check_keys


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    ckpt_every: int = 100
    keep: int = 3
    seed: int = 0
    # the frozen base of a LoRA adapter (model.lora): a training run's folder or a Hugging
    # Face folder; "": the base train.seed initialises
    base: str = ""

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "log_every", "eval_every", "ckpt_every"):
            check_range(self, name, 0, lo_open=True)
        check_range(self, "eval_batches", 0, lo_open=True, what="held-out batches per evaluation")
        check_range(
            self, "keep", 0, lo_open=True, what="checkpoints kept; 0 keeps none to resume from"
        )
        check_range(self, "seed", 0)
        check_range(self, "lr", 0.0, lo_open=True)
        check_range(self, "grad_clip", 0.0, lo_open=True)
        check_range(self, "weight_decay", 0.0)
        check_range(self, "min_lr_ratio", 0.0, 1.0)
        check_range(self, "b1", 0.0, 1.0, hi_open=True)
        check_range(self, "b2", 0.0, 1.0, hi_open=True)
        if not isinstance(self.base, str):
            raise ConfigError(f"train.base must be a path (str), got {self.base!r}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(
                f"train.warmup_steps must be in [0, train.steps={self.steps}), got "
                f"{self.warmup_steps}: lower train.warmup_steps along with train.steps"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        check_keys(cls, d, "train config")
        return cls(**dict(d))


def check_range(
    cfg, name: str, lo, hi=None, lo_open=False, hi_open=False, what="", section="train"
) -> None:
    """A ConfigError naming `<section>.<name>` and its allowed range unless `cfg.<name>` lies
    in it (bounds included unless `lo_open` / `hi_open`; no upper bound when `hi` is None)."""
    v = getattr(cfg, name)
    ok = (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))
    if not ok:
        if hi is None:
            allowed = f"{'>' if lo_open else '>='} {lo:g}"
        else:
            allowed = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        note = f" ({what})" if what else ""
        raise ConfigError(f"{section}.{name} must be {allowed}{note}, got {v}")


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warmup + cosine decay, global-norm clipping, no decay on vectors."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.adamw(
            lr_schedule(tc), b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay, mask=decay_mask
        ),
    )


def lr_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine decay to `lr * min_lr_ratio` at `steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=tc.lr,
        warmup_steps=tc.warmup_steps,
        decay_steps=tc.steps,
        end_value=tc.lr * tc.min_lr_ratio,
    )


def lr_at(tc: TrainConfig, step: int) -> float:
    return float(lr_schedule(tc)(step))
