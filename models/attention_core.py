"""Dense causal attention kernel shared by patterns and contexts."""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
