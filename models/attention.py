"""Grouped-query attention with rotary positions, and the full-sequence attention context.

A block computes q, k, v and hands them to an *attention context* that knows
the batch layout: `FullContext` (training, whole sequences, causal) here;
`PagedContext` (the serving engine's paged KV cache) in
`models/paged_context.py`. One model definition serves both.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from models.attention_core import causal_attention
from models.config import ModelConfig
from models.layers import apply_rope, constrain_act, param, project, rope_tables
from models.patterns import DenseCausal, pattern_for_layer
from sharding.rules import constrain

MODES = ("train", "eval", "serve")


@dataclasses.dataclass
class FullContext:
    """Whole causal sequences of a [B, L] batch, flattened to T = B * L tokens.

    `mode` tells mode-dependent layers what they serve: "train" (stochastic
    parts on, capacity-limited MoE routing), "eval" (deterministic, training
    routing) or "serve" (deterministic, batch-invariant: dropless MoE).
    `ordered` promises positions 0..L-1 in every row, so dense causal attention
    may skip the key blocks after each query block.
    """

    batch: int
    length: int
    positions_T: jax.Array
    mode: str = "train"
    ordered: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode '{self.mode}' is not one of {MODES}")

    def rope_positions(self):
        """Positions for RoPE: static (numpy) for ordered rows, so the tables are constants."""
        if self.ordered:
            return np.tile(np.arange(self.length, dtype=np.int32), self.batch)
        return self.positions_T

    def attend(self, layer: int, pattern, q_THX, k_TKX, v_TKX) -> jax.Array:
        del layer
        B, L = self.batch, self.length
        pos_BL = self.positions_T.reshape(B, L)
        q_BLHX, k_BLKX, v_BLKX = (a.reshape(B, L, *a.shape[1:]) for a in (q_THX, k_TKX, v_TKX))
        if self.ordered and pattern == DenseCausal():
            o_BLHX = causal_attention(q_BLHX, k_BLKX, v_BLKX, pos_BL, pos_BL, ordered=True)
        else:
            o_BLHX = pattern.full_attention(q_BLHX, k_BLKX, v_BLKX, pos_BL)
        return o_BLHX.reshape(B * L, *o_BLHX.shape[2:])


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
        self.cfg, self.layer = cfg, layer
        self.pattern = pattern_for_layer(cfg, layer)
        self.dtype = cfg.compute_dtype
        D, H, K, X = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = param(rngs, (D, H, X), ("embed", "heads", "head_dim"), cfg)
        self.wk = param(rngs, (D, K, X), ("embed", "kv_heads", "head_dim"), cfg)
        self.wv = param(rngs, (D, K, X), ("embed", "kv_heads", "head_dim"), cfg)
        self.wo = param(rngs, (H, X, D), ("heads", "head_dim", "embed"), cfg)
        self.lora = None  # LoRA adapters by target name (models/lora.py attaches them)

    def qkv(self, x_TD: jax.Array, pos_T: jax.Array, slots: jax.Array | None = None):
        """Projected and rotated q [T, H, X], k and v [T, K, X] (`slots`: the tokens'
        adapter slots in a serving pool of adapters, `models/lora_pool.py`)."""
        cos_TX, sin_TX = rope_tables(pos_T, self.cfg.head_dim, self.cfg.rope_theta)
        lora, dtype, s = self.lora, self.dtype, slots
        q = project("td,dhx->thx", x_TD, self.wq[...], dtype, lora, "q_proj", s)
        k = project("td,dkx->tkx", x_TD, self.wk[...], dtype, lora, "k_proj", s)
        v = project("td,dkx->tkx", x_TD, self.wv[...], dtype, lora, "v_proj", s)
        q, k = apply_rope(q, cos_TX, sin_TX), apply_rope(k, cos_TX, sin_TX)
        q = constrain(q, ("act_batch", "act_heads", None))
        k = constrain(k, ("act_batch", "act_kv_heads", None))
        v = constrain(v, ("act_batch", "act_kv_heads", None))
        return q, k, v

    def __call__(self, x_TD: jax.Array, ctx) -> jax.Array:
        pos_T = ctx.rope_positions() if isinstance(ctx, FullContext) else ctx.positions_T
        slots = getattr(ctx, "lora_slots", None)
        q, k, v = self.qkv(x_TD, pos_T, slots)
        o_THX = ctx.attend(self.layer, self.pattern, q, k, v)
        o_TD = project("thx,hxd->td", o_THX, self.wo[...], self.dtype, self.lora, "o_proj", slots)
        return constrain_act(o_TD, "act_embed")
