"""Basic layers: parameters with logical axes, RMSNorm, rotary positions, SwiGLU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import packed_matmul
from models.attention_core import can_fix_layouts, row_major
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
    """einsum in `dtype` with float32 accumulation (fast bf16 on CPU and TPU), and so are
    its two gradient matmuls (see `_dot_bwd`). A weight packed for serving
    (`models.packed_matmul`) goes to the native packed matmul instead."""
    if packed_matmul.is_packed(w):
        out = jnp.bfloat16 if jnp.dtype(dtype) == jnp.bfloat16 else jnp.float32
        return packed_matmul.packed_dot(eq, x, w, out).astype(dtype)
    return _dot(eq, jnp.dtype(dtype), x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _dot(eq, dtype, x, w):
    out = jnp.einsum(eq, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
    return out.astype(dtype)


def _dot_fwd(eq, dtype, x, w):
    return _dot(eq, dtype, x, w), (x, w)


def _dot_bwd(eq, dtype, res, g):
    """dx and dw as `dtype` matmuls with float32 accumulation, operands in the order the
    CPU's fast dot path takes. The default transpose of a float32-accumulating dot
    multiplies the float32 cotangent by the `dtype` operand: for bfloat16, a float32 dot.
    That default is kept for float32 (where it is the same) and where layouts cannot be
    fixed (`can_fix_layouts`: XLA:CPU may then pick a bf16 dot it cannot run)."""
    x, w = res
    xs, ws, outs = _parse(eq)
    if dtype == jnp.float32 or not can_fix_layouts():
        g = g.astype(jnp.float32)
        dx = jnp.einsum(f"{outs},{ws}->{xs}", g, w.astype(dtype), preferred_element_type=g.dtype)
        dw = jnp.einsum(f"{xs},{outs}->{ws}", x.astype(dtype), g, preferred_element_type=g.dtype)
    else:
        g = g.astype(dtype)
        dx = _canonical_einsum(outs, ws, xs, g, w.astype(dtype))
        dw = _canonical_einsum(xs, outs, ws, x.astype(dtype), g)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_dot.defvjp(_dot_fwd, _dot_bwd)


def _parse(eq: str) -> tuple[str, str, str]:
    ins, out = eq.replace(" ", "").split("->")
    a, b = ins.split(",")
    return a, b, out


def _canonical_einsum(sa: str, sb: str, so: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum `sa,sb->so` (float32 result) as a [batch, M, K] x [batch, K, N] dot.

    Operands are transposed (and kept transposed, see `row_major`) into that order
    only when they are not in it already; the result is transposed back to `so`.
    """
    batch = [c for c in sa if c in sb and c in so]
    contract = [c for c in sa if c in sb and c not in so]
    m = [c for c in sa if c not in sb]
    n = [c for c in sb if c not in sa]
    if sorted(so) != sorted(batch + m + n) or any(c not in sa + sb for c in so):
        raise ValueError(f"unsupported einsum {sa},{sb}->{so}")
    la, lb, lo = (
        "".join(batch + m + contract),
        "".join(batch + contract + n),
        "".join(batch + m + n),
    )
    if la != sa:
        a = row_major(jnp.einsum(f"{sa}->{la}", a))
    if lb != sb:
        b = row_major(jnp.einsum(f"{sb}->{lb}", b))
    out = jnp.einsum(f"{la},{lb}->{lo}", a, b, preferred_element_type=jnp.float32)
    return out if lo == so else jnp.einsum(f"{lo}->{so}", row_major(out))


def project(
    eq: str, x: jax.Array, w: jax.Array, dtype, lora=None, target: str = "", slots=None
) -> jax.Array:
    """dot(eq, x, w) plus the delta of the module's LoRA adapter on `target` (`lora` is a
    module's adapters by target name, `models/lora.py`, or None: then just the dot); a
    serving pool of adapters (`models/lora_pool.py`) reads the tokens' adapter `slots`."""
    y = dot(eq, x, w, dtype)
    if lora is None or target not in lora:
        return y
    return y + lora[target](x, slots)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, cfg: ModelConfig, rngs: nnx.Rngs):
        self.eps = cfg.norm_eps
        self.dtype = cfg.compute_dtype
        self.scale = param(rngs, (dim,), ("norm",), cfg, init=jnp.ones)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def rope_tables(positions, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [..., head_dim] in the half-split (Hugging Face Llama) layout.

    Static (numpy) positions give numpy tables, constants in a jitted caller:
    computed there at run time, XLA fuses cos and sin into every consumer and
    recomputes them per head, in each RoPE fusion of the forward and backward.
    """
    xp = np if isinstance(positions, np.ndarray) else jnp
    inv_freq = 1.0 / (theta ** (xp.arange(0, head_dim, 2, dtype=xp.float32) / head_dim))
    angles = positions.astype(xp.float32)[..., None] * inv_freq.astype(xp.float32)
    angles = xp.concatenate([angles, angles], axis=-1)
    return xp.cos(angles), xp.sin(angles)


@jax.custom_vjp
def apply_rope(x_BLHX: jax.Array, cos_BLX: jax.Array, sin_BLX: jax.Array) -> jax.Array:
    """Rotate q or k: x * cos + rotate_half(x) * sin, computed in float32."""
    x = x_BLHX.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos_BLX[..., None, :] + rotated * sin_BLX[..., None, :]
    return out.astype(x_BLHX.dtype)


def _rope_fwd(x_BLHX, cos_BLX, sin_BLX):
    return apply_rope(x_BLHX, cos_BLX, sin_BLX), (cos_BLX, sin_BLX)


def _rope_bwd(res, g_BLHX):
    """The inverse rotation (sin's halves are equal, so rotate_half^T(g * sin) =
    -rotate_half(g) * sin); the tables depend on positions only."""
    cos_BLX, sin_BLX = res
    return apply_rope(g_BLHX, cos_BLX, -sin_BLX), None, None


apply_rope.defvjp(_rope_fwd, _rope_bwd)


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(x @ gate) * (x @ up))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.dtype = cfg.compute_dtype
        d, f = cfg.d_model, cfg.d_ff
        self.w_gate = param(rngs, (d, f), ("embed", "mlp"), cfg)
        self.w_up = param(rngs, (d, f), ("embed", "mlp"), cfg)
        self.w_down = param(rngs, (f, d), ("mlp", "embed"), cfg)
        self.lora = None  # LoRA adapters by target name (models/lora.py attaches them)

    def __call__(self, x_TD: jax.Array, ctx=None, rng=None) -> tuple[jax.Array, dict]:
        """Flat tokens x [T, D]; no aux outputs (ctx and rng matter only to MoE layers)."""
        del rng
        lora, dtype, s = self.lora, self.dtype, getattr(ctx, "lora_slots", None)
        gate_TF = project("td,df->tf", x_TD, self.w_gate[...], dtype, lora, "gate_proj", s)
        up_TF = project("td,df->tf", x_TD, self.w_up[...], dtype, lora, "up_proj", s)
        h_TF = constrain_act(jax.nn.silu(gate_TF) * up_TF, "act_mlp")
        return project("tf,fd->td", h_TF, self.w_down[...], dtype, lora, "down_proj", s), {}
