"""Fine-tuning a part of a model's parameters while the rest stays frozen: the MoE routers,
norms or LoRA adapter (`models.lora.add_adapter`) of a model that an engine serves at the
same time (`cotrain.coserve`).

    tuner = Tuner(model, TunerConfig(targets=("router",)))
    metrics = tuner.step(batch_BL1)      # one AdamW step on the routers only
    engine.update_params(tuner.trainable)  # the engine serves the tuned routers

Optimizer state exists for the trainable parameters only; the frozen ones are never
copied. Each step bumps `version`; `snapshot()` keeps the trainable parameters of the
current version (small: routers are D x E per MoE layer).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mlx_sched.train.optim import check_range
from mlx_sched.train.steps import model_loss
from models.config import ConfigError, check_keys
from models.lora import LoraParam

TARGETS = ("router", "norm", "lora")  # what a tuner may train


def is_target(targets: Sequence[str]):
    """An nnx filter: parameters named by `targets` ("router": MoE routers; "norm": RMSNorm
    scales; "lora": the model's LoRA adapter, `models.lora`)."""

    def keep(path, value) -> bool:
        if not isinstance(value, nnx.Param) or not path:
            return False
        if isinstance(value, LoraParam):
            return "lora" in targets
        last, parent = str(path[-1]), str(path[-2]) if len(path) > 1 else ""
        return ("router" in targets and last == "router") or (
            "norm" in targets and last == "scale" and parent.endswith("norm")
        )

    return keep


@dataclasses.dataclass(frozen=True)
class TunerConfig:
    targets: tuple[str, ...] = ("router",)
    lr: float = 1e-3  # constant: a tuner runs for as long as the engine serves
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 8
    seq_len: int = 128
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ConfigError(f"tuner.targets must be a non-empty subset of {TARGETS}, got {bad}")
        for name in ("lr", "grad_clip", "batch_size", "seq_len"):
            check_range(self, name, 0, lo_open=True, section="tuner")
        check_range(self, "weight_decay", 0.0, section="tuner")
        for name in ("b1", "b2"):
            check_range(self, name, 0.0, 1.0, hi_open=True, section="tuner")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TunerConfig:
        check_keys(cls, d, "tuner config")
        return cls(**dict(d))


class Tuner:
    """AdamW on the parameters `cfg.targets` selects, the rest of `model` frozen."""

    def __init__(self, model, cfg: TunerConfig | None = None):
        self.cfg = cfg = cfg or TunerConfig()
        self.model_cfg = model.cfg
        keep = is_target(cfg.targets)
        self.graphdef, self.trainable, self.frozen = nnx.split(model, keep, nnx.Param)
        if not jax.tree.leaves(self.trainable):
            what = " or ".join(cfg.targets)
            raise ConfigError(f"the model has no {what} parameters to tune")
        self.tx = optax.chain(
            optax.clip_by_global_norm(cfg.grad_clip),
            optax.adamw(cfg.lr, cfg.b1, cfg.b2, weight_decay=cfg.weight_decay),
        )
        self.opt_state = self.tx.init(self.trainable)
        self.version = 0  # bumped by every step
        # the optimizer state is donated; the trainable parameters are not (an engine may serve
        # from their buffers: `Engine.update_params` places them without a copy)
        self._step = jax.jit(
            functools.partial(_step, self.graphdef, self.tx, cfg.seed), donate_argnums=(2,)
        )
        self._eval = jax.jit(functools.partial(_eval, self.graphdef), static_argnums=(3,))

    def warmup(self) -> None:
        """Compile the step and the evaluations of [batch_size, seq_len + 1] batches now, not
        in the middle of serving. Two throw-away steps on copies: a step's outputs are placed
        differently from the parameters `nnx.split` gave, so the second step compiles again."""
        batch = jnp.zeros((self.cfg.batch_size, self.cfg.seq_len + 1), jnp.int32)
        tr, opt = self.snapshot(), jax.tree.map(jnp.copy, self.opt_state)
        for i in range(2):
            tr, opt, _ = self._step(tr, self.frozen, opt, batch, jnp.int32(i))
        for mode in ("eval", "serve"):
            for params in (self.trainable, tr):
                jax.block_until_ready(self._eval(params, self.frozen, batch, mode))

    @property
    def num_trainable(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.trainable))

    def step(self, batch_BL1) -> dict:
        """One optimizer step on a batch of windows [B, L + 1] -> metrics (floats and lists)."""
        self.trainable, self.opt_state, m = self._step(
            self.trainable,
            self.frozen,
            self.opt_state,
            jnp.asarray(batch_BL1),
            jnp.int32(self.version),
        )
        self.version += 1
        return _host(m)

    def evaluate(self, batch_BL1, mode: str = "eval", trainable=None) -> dict:
        """Cross-entropy and router statistics of a batch without training ("serve": routed as
        the engine routes, dropless)."""
        tr = self.trainable if trainable is None else trainable
        return _host(self._eval(tr, self.frozen, jnp.asarray(batch_BL1), mode))

    def snapshot(self):
        """The trainable parameters now (a new tree: later steps do not change it)."""
        return jax.tree.map(jnp.copy, self.trainable)

    def model(self, trainable=None):
        """The whole model with `trainable` (the current ones by default): a fresh engine's."""
        return nnx.merge(
            self.graphdef, self.trainable if trainable is None else trainable, self.frozen
        )


def _step(graphdef, tx, seed, trainable, frozen, opt_state, batch_BL1, step):
    rng = jax.random.fold_in(jax.random.key(seed), step)

    def loss(tr):
        return model_loss(nnx.merge(graphdef, tr, frozen), batch_BL1, rng, "train")

    (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    return trainable, opt_state, {**metrics, "loss": value, "grad_norm": optax.tree.norm(grads)}


def _eval(graphdef, trainable, frozen, batch_BL1, mode):
    _, metrics = model_loss(nnx.merge(graphdef, trainable, frozen), batch_BL1, None, mode)
    return metrics


def _host(metrics) -> dict:
    out = {}
    for k, v in jax.device_get(metrics).items():
        v = np.asarray(v)
        out[k] = float(v) if v.ndim == 0 else v.astype(np.float64).tolist()
    return out
