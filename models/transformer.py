"""Decoder-only Transformer: embed -> N x (attention + MLP) -> norm -> logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models import lora
from models.attention import Attention, FullContext
from models.config import ModelConfig
from models.layers import MLP, RMSNorm, constrain_act, dot, param
from models.moe import MoE
from sharding.rules import constrain


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.d_model, cfg, rngs)
        self.attn = Attention(cfg, layer, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg, rngs)
        moe = cfg.moe is not None and cfg.moe.is_moe_layer(layer)
        self.mlp = MoE(cfg, rngs) if moe else MLP(cfg, rngs)

    def __call__(self, x_TD: jax.Array, ctx, rng=None) -> tuple[jax.Array, dict]:
        x_TD = x_TD + self.attn(self.attn_norm(x_TD), ctx)
        h_TD, aux = self.mlp(self.mlp_norm(x_TD), ctx, rng=rng)
        return constrain_act(x_TD + h_TD, "act_embed"), aux


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg)
        self.layers = nnx.List([Block(cfg, i, rngs) for i in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg)
        if cfg.lora is not None:  # after every base weight: the same base for one seed
            lora.attach(self, cfg.lora, rngs)

    def embed_tokens(self, tokens_T: jax.Array) -> jax.Array:
        # Gather from a replicated copy of the table: a gather from a vocab- and
        # embed-sharded table makes GSPMD rematerialise it anyway, less cleanly.
        table_VD = constrain(self.embed[...], (None, None))
        x_TD = jnp.take(table_VD, tokens_T, axis=0).astype(self.cfg.compute_dtype)
        return constrain_act(x_TD, "act_embed")

    def logits(self, x_TD: jax.Array) -> jax.Array:
        """Final norm and output head; logits are float32."""
        x_TD = self.final_norm(x_TD)
        if self.cfg.tie_embeddings:
            logits = dot("td,vd->tv", x_TD, self.embed[...], self.cfg.compute_dtype)
        else:
            logits = dot("td,dv->tv", x_TD, self.lm_head[...], self.cfg.compute_dtype)
        return constrain_act(logits.astype(jnp.float32), "act_vocab")

    def forward(self, x_TD: jax.Array, ctx, rng: jax.Array | None = None):
        """Blocks on flat token embeddings [T, D] under an attention context.

        Returns the final hidden states [T, D] and per-layer aux outputs. `rng`
        (training only) feeds stochastic layers such as router jitter; None
        means deterministic inference.
        """
        aux = {}
        for block in self.layers:
            layer_rng = None if rng is None else jax.random.fold_in(rng, block.layer)
            x_TD, layer_aux = block(x_TD, ctx, layer_rng)
            if layer_aux:
                aux[f"layer_{block.layer}"] = layer_aux
        return x_TD, aux

    def __call__(
        self,
        tokens_BL: jax.Array,
        pos_BL: jax.Array | None = None,
        *,
        rng: jax.Array | None = None,
        mode: str = "serve",
        return_aux: bool = False,
        embeddings_BLD: jax.Array | None = None,
    ):
        """tokens [B, L] -> logits [B, L, V] (and, with return_aux, a dict of aux outputs).

        `mode` is "train", "eval" or "serve" (see FullContext); `embeddings_BLD`,
        if given, replaces the token embeddings (for gradient checks w.r.t. inputs).
        """
        B, L = tokens_BL.shape
        ordered = pos_BL is None
        if ordered:
            pos_BL = jnp.broadcast_to(jnp.arange(L), (B, L))
        if embeddings_BLD is None:
            x_TD = self.embed_tokens(tokens_BL.reshape(B * L))
        else:
            x_TD = embeddings_BLD.reshape(B * L, -1).astype(self.cfg.compute_dtype)
        ctx = FullContext(B, L, pos_BL.reshape(B * L), mode, ordered)
        x_TD, aux = self.forward(x_TD, ctx, rng)
        logits_BLV = self.logits(x_TD).reshape(B, L, -1)
        return (logits_BLV, aux) if return_aux else logits_BLV
