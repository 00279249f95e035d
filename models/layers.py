"""Basic layers: parameters with logical axes, RMSNorm, rotary positions, SwiGLU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from sharding.rules import constrain


def param(rngs: nnx.Rngs, shape, axes, cfg: ModelConfig, std: float | None = None, init=None):
    """An nnx.Param carrying its logical axis names as `axes` metadata."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {shape}")
    if init is None:
        std = cfg.init_std if std is None else std
        value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
    else:
        value = init(shape)
    return nnx.Param(value.astype(cfg.weight_dtype), axes=tuple(axes))


def constrain_act(x: jax.Array, last: str) -> jax.Array:
    """Constrain an activation [B, (L,) ..., last] or [T, last]: batch-like first dim."""
    return constrain(x, ("act_batch",) + ("act_length",) * (x.ndim - 2) + (last,))


def dot(eq: str, x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """einsum in `dtype` with float32 accumulation (fast bf16 on CPU and TPU)."""
    out = jnp.einsum(eq, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
    return out.astype(dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, cfg: ModelConfig, rngs: nnx.Rngs):
        self.eps = cfg.norm_eps
        self.dtype = cfg.compute_dtype
        self.scale = param(rngs, (dim,), ("norm",), cfg, init=jnp.ones)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [..., head_dim] in the half-split (Hugging Face Llama) layout."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BLHX: jax.Array, cos_BLX: jax.Array, sin_BLX: jax.Array) -> jax.Array:
    """Rotate q or k: x * cos + rotate_half(x) * sin, computed in float32."""
    x = x_BLHX.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos_BLX[..., None, :] + rotated * sin_BLX[..., None, :]
    return out.astype(x_BLHX.dtype)


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(x @ gate) * (x @ up))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.dtype = cfg.compute_dtype
        d, f = cfg.d_model, cfg.d_ff
        self.w_gate = param(rngs, (d, f), ("embed", "mlp"), cfg)
        self.w_up = param(rngs, (d, f), ("embed", "mlp"), cfg)
        self.w_down = param(rngs, (f, d), ("mlp", "embed"), cfg)

    def __call__(self, x_TD: jax.Array, ctx=None, rng=None) -> tuple[jax.Array, dict]:
        """Flat tokens x [T, D]; no aux outputs (ctx and rng matter only to MoE layers)."""
        del ctx, rng
        gate_TF = dot("td,df->tf", x_TD, self.w_gate[...], self.dtype)
        up_TF = dot("td,df->tf", x_TD, self.w_up[...], self.dtype)
        h_TF = constrain_act(jax.nn.silu(gate_TF) * up_TF, "act_mlp")
        return dot("tf,fd->td", h_TF, self.w_down[...], self.dtype), {}
