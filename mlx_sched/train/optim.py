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

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "log_every", "eval_every", "ckpt_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be > 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.grad_clip <= 0:
            raise ConfigError("train.lr and train.grad_clip must be > 0")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError(f"train.warmup_steps must be in [0, steps], got {self.warmup_steps}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        check_keys(cls, d, "train config")
        return cls(**dict(d))


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
