"""The pure steps of language-model training: the loss (next-token cross-entropy plus the
model's auxiliary losses), one AdamW step and a held-out evaluation. `loop.Trainer` wraps
them with their shardings and donation; `cotrain.tuner` reuses the loss.

A step takes `(params, opt_state, batch, step)` and returns `(params, opt_state, metrics)`;
`frozen`, where given, holds the weights `params` lacks (a LoRA adapter's base): no
gradient, never written.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mlx_sched.train import data as data_lib
from models.transformer import Transformer


def loss_fn(params, graphdef, batch_BL1, rng, mode="train", frozen=None):
    """Next-token cross-entropy (float32) plus any auxiliary losses the model returns;
    `frozen`, if given, holds the weights `params` lacks (a LoRA adapter's base)."""
    model = nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)
    return model_loss(model, batch_BL1, rng, mode)


def model_loss(model: Transformer, batch_BL1, rng, mode="train"):
    """`loss_fn` of a merged model: (loss, metrics with "ce", "aux_loss" and per-layer aux)."""
    inputs_BL, targets_BL = batch_BL1[:, :-1], batch_BL1[:, 1:]
    logits_BLV, aux = model(inputs_BL, return_aux=True, rng=rng, mode=mode)
    logp_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
    nll_BL = -jnp.take_along_axis(logp_BLV, targets_BL[..., None], axis=-1)[..., 0]
    weights_BL = (targets_BL != data_lib.PAD).astype(jnp.float32)
    ce = jnp.sum(nll_BL * weights_BL) / jnp.maximum(jnp.sum(weights_BL), 1.0)
    aux_loss = sum((a["loss"] for a in aux.values() if "loss" in a), jnp.zeros((), jnp.float32))
    metrics = {"ce": ce, "aux_loss": aux_loss, **_aux_metrics(aux)}
    return ce + aux_loss, metrics


def _aux_metrics(aux: dict) -> dict:
    """Flatten per-layer aux outputs into `layer_i/name` metrics (scalars or small vectors,
    such as an MoE layer's tokens per expert, logged as JSON lists)."""
    out = {}
    for layer, d in aux.items():
        for k, v in d.items():
            if k != "loss" and jnp.ndim(v) <= 1:
                out[f"{layer}/{k}"] = v
    return out


def train_step(graphdef, tx, seed, params, opt_state, batch_BL1, step, frozen=None):
    """One AdamW step on `params` (the gradient is taken w.r.t. them only, not `frozen`)."""
    rng = jax.random.fold_in(jax.random.key(seed), step)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, graphdef, batch_BL1, rng, frozen=frozen
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
    return params, opt_state, metrics


def eval_step(graphdef, params, batch_BL1, frozen=None, mode="eval"):
    _, metrics = loss_fn(params, graphdef, batch_BL1, None, mode=mode, frozen=frozen)
    return metrics["ce"]
