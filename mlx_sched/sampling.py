"""On-device sampling: greedy, temperature, top-k, top-p, with per-request keys.

Each row's key is derived from (request seed, sequence index, position) only,
so a request's samples do not depend on what it was batched with.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def row_keys(seed_S: jax.Array, seq_S: jax.Array, pos_S: jax.Array) -> jax.Array:
    def one(seed, seq, pos):
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), seq), pos)

    return jax.vmap(one)(seed_S, seq_S, pos_S)


def _filter_top_k_top_p(logits_SV, top_k_S, top_p_S):
    """Mask logits outside each row's top-k and top-p (nucleus) sets; exact, via one sort."""
    V = logits_SV.shape[-1]
    sorted_SV = -jnp.sort(-logits_SV, axis=-1)
    k_S = jnp.where(top_k_S > 0, jnp.minimum(top_k_S, V), V)
    kth_S = jnp.take_along_axis(sorted_SV, (k_S - 1)[:, None], axis=-1)[:, 0]
    probs_SV = jax.nn.softmax(sorted_SV, axis=-1)
    before_SV = jnp.cumsum(probs_SV, axis=-1) - probs_SV  # mass strictly above each token
    keep_SV = before_SV < top_p_S[:, None]
    n_keep_S = jnp.maximum(jnp.sum(keep_SV, axis=-1), 1)
    pth_S = jnp.take_along_axis(sorted_SV, (n_keep_S - 1)[:, None], axis=-1)[:, 0]
    threshold_S = jnp.maximum(kth_S, pth_S)
    return jnp.where(logits_SV >= threshold_S[:, None], logits_SV, -jnp.inf)


def sample(
    logits_SV: jax.Array,
    temperature_S: jax.Array,
    top_k_S: jax.Array,
    top_p_S: jax.Array,
    seed_S: jax.Array,
    seq_S: jax.Array,
    pos_S: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Next token per row and its log-probability under the model (before filtering)."""
    logits_SV = logits_SV.astype(jnp.float32)
    greedy_S = jnp.argmax(logits_SV, axis=-1).astype(jnp.int32)
    scaled_SV = logits_SV / jnp.maximum(temperature_S, 1e-6)[:, None]
    needs_filter = jnp.any((top_k_S > 0) | (top_p_S < 1.0))
    scaled_SV = jax.lax.cond(
        needs_filter,
        lambda x: _filter_top_k_top_p(x, top_k_S, top_p_S),
        lambda x: x,
        scaled_SV,
    )
    keys = row_keys(seed_S, seq_S, pos_S)
    drawn_S = jax.vmap(jax.random.categorical)(keys, scaled_SV).astype(jnp.int32)
    token_S = jnp.where(temperature_S > 0, drawn_S, greedy_S)
    logp_SV = jax.nn.log_softmax(logits_SV, axis=-1)
    return token_S, jnp.take_along_axis(logp_SV, token_S[:, None], axis=-1)[:, 0]
