"""Offloaded greedy generation of a padded batch, layer by layer (FlexGen's order for one batch).

Each step (the prefill, then one per generated token) runs the blocks one at a time. Before a
layer computes, the next layer's host-resident weights and KV are put on the device
(`jax.device_put`, asynchronous), so the transfer overlaps the current layer's compute; a
layer's streamed buffers are dropped once its output is ready, so at most two layers' streamed
buffers are resident at once. A host-resident KV cache gets back only the positions the step
wrote (FlexGen's "write"). Every device-tier buffer is charged to a `DeviceBudget`.

Letters as in models/__init__.py: B batch, L query length, T cache length, D model,
H heads, K kv heads, X head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlx_sched.offload import tiers
from models.attention_core import causal_attention
from models.config import ConfigError
from models.moe_config import check_servable
from models.patterns import DenseCausal, pattern_for_layer

# -- the per-layer step ------------------------------------------------------------------------


@dataclasses.dataclass
class CacheContext:
    """Attention over one layer's KV cache [B, T, K, X]: the step's tokens [B, L] are written at
    their positions, then each query sees the cache up to its own position."""

    k_BTKX: jax.Array
    v_BTKX: jax.Array
    pos_BL: jax.Array
    mode: str = "serve"

    @property
    def positions_T(self) -> jax.Array:
        return self.pos_BL.reshape(-1)

    def attend(self, layer: int, pattern, q_THX, k_TKX, v_TKX) -> jax.Array:
        del layer, pattern  # dense causal only (checked when the model is offloaded)
        B, L = self.pos_BL.shape
        rows_B1 = jnp.arange(B)[:, None]
        k_BLKX, v_BLKX = (a.reshape(B, L, *a.shape[1:]) for a in (k_TKX, v_TKX))
        self.k_BTKX = self.k_BTKX.at[rows_B1, self.pos_BL].set(k_BLKX.astype(self.k_BTKX.dtype))
        self.v_BTKX = self.v_BTKX.at[rows_B1, self.pos_BL].set(v_BLKX.astype(self.v_BTKX.dtype))
        T = self.k_BTKX.shape[1]
        k_pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=self.pos_BL.dtype), (B, T))
        q_BLHX = q_THX.reshape(B, L, *q_THX.shape[1:])
        o_BLHX = causal_attention(q_BLHX, self.k_BTKX, self.v_BTKX, self.pos_BL, k_pos_BT)
        return o_BLHX.reshape(B * L, *o_BLHX.shape[2:])


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(3, 4))
def layer_step(graphdef, params, x_TD, k_BTKX, v_BTKX, pos_BL):
    """One block on x [B * L, D] over its KV cache; (x, k, v) after it (k, v donated)."""
    ctx = CacheContext(k_BTKX, v_BTKX, pos_BL)
    x_TD, _ = nnx.merge(graphdef, params)(x_TD, ctx)
    return x_TD, ctx.k_BTKX, ctx.v_BTKX


@jax.jit
def _written(k_BTKX, v_BTKX, pos_BL):
    """The cache entries a step wrote, [B, L, K, X] each: what goes back to a host-resident KV."""
    rows_B1 = jnp.arange(k_BTKX.shape[0])[:, None]
    return k_BTKX[rows_B1, pos_BL], v_BTKX[rows_B1, pos_BL]


@functools.partial(jax.jit, static_argnums=(0,))
def _embed(graphdef, params, tokens_BL):
    B, L = tokens_BL.shape
    return nnx.merge(graphdef, params).embed_tokens(tokens_BL.reshape(B * L))


@functools.partial(jax.jit, static_argnums=(0,))
def _greedy(graphdef, params, x_TD, last_B):
    """Argmax token of each row at its last position (x is [B * L, D])."""
    B = last_B.shape[0]
    x_BLD = x_TD.reshape(B, -1, x_TD.shape[-1])
    x_BD = jnp.take_along_axis(x_BLD, last_B[:, None, None], axis=1)[:, 0]
    return jnp.argmax(nnx.merge(graphdef, params).logits(x_BD), axis=-1).astype(jnp.int32)


# -- the tiers ---------------------------------------------------------------------------------


def _split_head(model: nnx.Module):
    """(graphdef, state) of the model without its blocks: embedding, final norm, output head."""
    layers = model.layers
    model.layers = nnx.List([])
    try:
        return nnx.split(model)
    finally:
        model.layers = layers


class OffloadedModel:
    """A model's layers in two tiers under a `Placement`, charged to a `DeviceBudget`.

    The model passed in is the source of the weights: resident layers share its arrays;
    host-tier copies are made in the backend's host memory kind (numpy where there is none).
    """

    def __init__(self, model: nnx.Module, placement: tiers.Placement, device=None):
        cfg = model.cfg
        check_servable(cfg)
        if placement.n_layers != cfg.n_layers:
            raise ConfigError(f"placement has {placement.n_layers} layers, model {cfg.n_layers}")
        for i in range(cfg.n_layers):
            if pattern_for_layer(cfg, i) != DenseCausal():
                raise ConfigError(f"offloaded generate supports dense attention; layer {i} is not")
        self.cfg, self.placement = cfg, placement
        self.on_device, on_host = tiers.shardings(device)
        self.to_host = (lambda t: jax.device_put(t, on_host)) if on_host else _to_numpy
        self.head = _split_head(model)
        self.graphdefs, self.weights = [], []
        shared: dict = {}  # blocks of one structure share a graphdef: one compilation each
        for i, block in enumerate(model.layers):
            graphdef, state = nnx.split(block)
            key = (jax.tree.structure(state), type(block.mlp).__name__)
            self.graphdefs.append(shared.setdefault(key, graphdef))
            on_dev = placement.weights_on_device[i]
            self.weights.append(state if on_dev else self.to_host(state))


def _to_numpy(tree):
    return jax.tree.map(lambda a: np.array(a), tree)


@dataclasses.dataclass
class Generation:
    """Tokens and what it took: seconds per step (prefill first) and per layer of each decode
    step ([steps, N]: a layer's streaming issue, compute and KV write-back), peak device bytes."""

    tokens: list[list[int]]
    prefill_s: float
    step_s: list[float]
    layer_s: np.ndarray
    peak_bytes: int
    required_bytes: int


class _Run:
    """One generate call: the KV caches in their tiers and the streaming schedule."""

    def __init__(self, om: OffloadedModel, budget: tiers.DeviceBudget, B: int, T: int):
        self.om, self.budget, cfg = om, budget, om.cfg
        shape = (B, T, cfg.n_kv_heads, cfg.head_dim)
        self.kv_nbytes = tiers.kv_bytes(cfg, B, T)
        self.kv = []
        for i, on_dev in enumerate(om.placement.kv_on_device):
            if on_dev:
                budget.reserve(f"kv{i}", self.kv_nbytes)
                zeros = functools.partial(jnp.zeros, shape, cfg.compute_dtype, device=om.on_device)
                self.kv.append([zeros(), zeros()])  # two buffers: both are donated
            else:
                self.kv.append([np.zeros(shape, jnp.dtype(cfg.compute_dtype)) for _ in "kv"])

    def fetch(self, i: int):
        """Issue layer i's transfers to the device tier: (params, k, v)."""
        om, cfg = self.om, self.om.cfg
        params = om.weights[i]
        if not om.placement.weights_on_device[i]:
            self.budget.reserve(f"stream_w{i}", tiers.layer_bytes(cfg, i))
            params = jax.device_put(params, om.on_device)
        k, v = self.kv[i]
        if not om.placement.kv_on_device[i]:
            self.budget.reserve(f"stream_kv{i}", self.kv_nbytes)
            k, v = jax.device_put(k, om.on_device), jax.device_put(v, om.on_device)
        return params, k, v

    def layers(self, x_TD: jax.Array, pos_BL: jax.Array, layer_s: list[float] | None):
        """All blocks on x, layer i + 1 streaming in while layer i computes."""
        om, N = self.om, self.om.cfg.n_layers
        nxt = self.fetch(0)
        t = time.perf_counter()
        for i in range(N):
            params, k, v = nxt
            if i + 1 < N:
                nxt = self.fetch(i + 1)
            x_TD, k, v = layer_step(om.graphdefs[i], params, x_TD, k, v, pos_BL)
            x_TD.block_until_ready()  # layer i's streamed buffers are free from here
            if om.placement.kv_on_device[i]:
                self.kv[i] = [k, v]
            else:
                k_new, v_new = jax.device_get(_written(k, v, pos_BL))
                rows_B1 = np.arange(k_new.shape[0])[:, None]
                pos = np.asarray(pos_BL)
                self.kv[i][0][rows_B1, pos], self.kv[i][1][rows_B1, pos] = k_new, v_new
                self.budget.release(f"stream_kv{i}")
            if not om.placement.weights_on_device[i]:
                self.budget.release(f"stream_w{i}")
            del params, k, v
            if layer_s is not None:
                now = time.perf_counter()
                layer_s.append(now - t)
                t = now
        return x_TD


def generate(
    model: nnx.Module,
    prompts: list[list[int]],
    max_tokens: int,
    placement: tiers.Placement,
    cap_bytes: int | None = None,
    device=None,
) -> Generation:
    """Greedy continuation of each prompt by `max_tokens` tokens, the layers' weights and KV in
    the tiers `placement` names, the device tier capped at `cap_bytes` (None: uncapped)."""
    B = len(prompts)
    if B == 0:
        raise ConfigError("offloaded generate needs at least one prompt (batch 0)")
    if max_tokens < 1:
        raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}")
    lengths_B = np.array([len(p) for p in prompts], np.int32)
    if lengths_B.min() < 1:
        raise ConfigError("every prompt needs at least one token")
    Lp = int(lengths_B.max())
    T = Lp + max_tokens - 1  # the last generated token is never fed back
    cfg = model.cfg
    need = tiers.check_fits(cfg, placement, B, Lp, T, cap_bytes)
    om = OffloadedModel(model, placement, device)
    budget = tiers.DeviceBudget(cap_bytes)
    budget.reserve("head", tiers.head_bytes(cfg))
    budget.reserve("activations", tiers.activation_bytes(cfg, B, Lp, T))
    for i, on_dev in enumerate(placement.weights_on_device):
        if on_dev:
            budget.reserve(f"w{i}", tiers.layer_bytes(cfg, i))
    run = _Run(om, budget, B, T)
    head_gd, head_params = om.head

    tokens_BL = np.zeros((B, Lp), np.int32)
    for b, p in enumerate(prompts):
        tokens_BL[b, : len(p)] = p
    t0 = time.perf_counter()
    pos_BL = jnp.asarray(np.broadcast_to(np.arange(Lp, dtype=np.int32), (B, Lp)))
    x_TD = run.layers(_embed(head_gd, head_params, jnp.asarray(tokens_BL)), pos_BL, None)
    nxt_B = np.asarray(_greedy(head_gd, head_params, x_TD, jnp.asarray(lengths_B - 1)))
    step_s, layer_s = [time.perf_counter() - t0], []
    out = [nxt_B]
    zeros_B = jnp.zeros((B,), jnp.int32)
    for s in range(max_tokens - 1):
        t0 = time.perf_counter()
        pos_B1 = jnp.asarray((lengths_B + s)[:, None])
        x_TD = _embed(head_gd, head_params, jnp.asarray(nxt_B[:, None]))
        x_TD = run.layers(x_TD, pos_B1, layer_s)
        nxt_B = np.asarray(_greedy(head_gd, head_params, x_TD, zeros_B))
        out.append(nxt_B)
        step_s.append(time.perf_counter() - t0)
    tokens = np.stack(out, axis=1).tolist()
    return Generation(
        tokens=tokens,
        prefill_s=step_s[0],
        step_s=step_s[1:],
        layer_s=np.array(layer_s).reshape(max_tokens - 1, cfg.n_layers),
        peak_bytes=budget.peak_bytes,
        required_bytes=need,
    )
