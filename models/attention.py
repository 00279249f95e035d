"""Grouped-query attention with rotary positions, and the full-sequence attention context.

A block computes q, k, v and hands them to an *attention context* that knows
the batch layout: `FullContext` (training, whole sequences, causal) here;
`PagedContext` (the serving engine's paged KV cache) in
`models/paged_attention.py`. One model definition serves both.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.layers import apply_rope, constrain_act, dot, param, rope_tables
from sharding.rules import constrain

NEG_INF = -1e30


def causal_attention(
    q_BLHX: jax.Array,
    k_BTKX: jax.Array,
    v_BTKX: jax.Array,
    q_pos_BL: jax.Array,
    k_pos_BT: jax.Array,
) -> jax.Array:
    """Dense attention where query i sees keys with position <= its own; f32 softmax.

    Query heads of one kv head are folded into the query length so each
    (batch, kv head) pair is one plain matmul (faster on CPU than a 5-D einsum).
    """
    B, L, H, X = q_BLHX.shape
    T, K = k_BTKX.shape[1], k_BTKX.shape[2]
    Q = H // K
    q_BKMX = q_BLHX.reshape(B, L, K, Q, X).transpose(0, 2, 3, 1, 4).reshape(B, K, Q * L, X)
    k_BKTX = k_BTKX.transpose(0, 2, 1, 3)
    v_BKTX = v_BTKX.transpose(0, 2, 1, 3)
    s_BKMT = jnp.einsum("bkmx,bktx->bkmt", q_BKMX, k_BKTX, preferred_element_type=jnp.float32)
    s_BKQLT = s_BKMT.reshape(B, K, Q, L, T) * (X**-0.5)
    mask_BLT = k_pos_BT[:, None, :] <= q_pos_BL[:, :, None]
    s_BKQLT = jnp.where(mask_BLT[:, None, None], s_BKQLT, NEG_INF)
    p_BKMT = jax.nn.softmax(s_BKQLT, axis=-1).astype(v_BTKX.dtype).reshape(B, K, Q * L, T)
    o_BKMX = jnp.einsum("bkmt,bktx->bkmx", p_BKMT, v_BKTX, preferred_element_type=jnp.float32)
    o_BLHX = o_BKMX.reshape(B, K, Q, L, X).transpose(0, 3, 1, 2, 4).reshape(B, L, H, X)
    return o_BLHX.astype(q_BLHX.dtype)


@dataclasses.dataclass
class FullContext:
    """Whole causal sequences of a [B, L] batch, flattened to T = B * L tokens."""

    batch: int
    length: int
    positions_T: jax.Array

    def attend(self, layer: int, q_THX, k_TKX, v_TKX) -> jax.Array:
        del layer
        B, L = self.batch, self.length
        pos_BL = self.positions_T.reshape(B, L)
        unflat = lambda a: a.reshape(B, L, *a.shape[1:])
        o_BLHX = causal_attention(unflat(q_THX), unflat(k_TKX), unflat(v_TKX), pos_BL, pos_BL)
        return o_BLHX.reshape(B * L, *o_BLHX.shape[2:])


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
        self.cfg, self.layer = cfg, layer
        self.dtype = cfg.compute_dtype
        D, H, K, X = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = param(rngs, (D, H, X), ("embed", "heads", "head_dim"), cfg)
        self.wk = param(rngs, (D, K, X), ("embed", "kv_heads", "head_dim"), cfg)
        self.wv = param(rngs, (D, K, X), ("embed", "kv_heads", "head_dim"), cfg)
        self.wo = param(rngs, (H, X, D), ("heads", "head_dim", "embed"), cfg)

    def qkv(self, x_TD: jax.Array, pos_T: jax.Array):
        """Projected and rotated q [T, H, X], k and v [T, K, X]."""
        cos_TX, sin_TX = rope_tables(pos_T, self.cfg.head_dim, self.cfg.rope_theta)
        q = dot("td,dhx->thx", x_TD, self.wq[...], self.dtype)
        k = dot("td,dkx->tkx", x_TD, self.wk[...], self.dtype)
        v = dot("td,dkx->tkx", x_TD, self.wv[...], self.dtype)
        q, k = apply_rope(q, cos_TX, sin_TX), apply_rope(k, cos_TX, sin_TX)
        q = constrain(q, ("act_batch", "act_heads", None))
        k = constrain(k, ("act_batch", "act_kv_heads", None))
        v = constrain(v, ("act_batch", "act_kv_heads", None))
        return q, k, v

    def __call__(self, x_TD: jax.Array, ctx) -> jax.Array:
        q, k, v = self.qkv(x_TD, ctx.positions_T)
        o_THX = ctx.attend(self.layer, q, k, v)
        return constrain_act(dot("thx,hxd->td", o_THX, self.wo[...], self.dtype), "act_embed")
