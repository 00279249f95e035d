"""Attention of query blocks over gathered key sets, and the consumers built on it.

One primitive, `block_attention`, computes softmax attention of R independent
query blocks, each over its own W gathered keys under an explicit mask. The
Sparse Transformer's efficient forms (models/sparse_attention.py), the dense
masked reference and the decode step below are all this primitive with
different gathers.

Letters beyond the key in models/__init__.py: R blocks (groups of queries
sharing one key set), M queries per block, W keys per block, U key positions
gathered for one decoding query. In a pattern mask `[B, P, L, T]`, P is 1
(every head alike) or H (one row per query head), as in models/patterns.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.attention_core import NEG_INF


def block_attention(q_BRMHX, k_BRWKX, v_BRWKX, mask_BRPMW):
    """Masked softmax attention per block; returns (out_BRMHX float32, lse_BRMH float32).

    `lse` is the log-sum-exp of the masked scores, so outputs over disjoint key
    sets merge exactly (`merge_partial`). A query that sees no key outputs
    zeros, with lse ~ NEG_INF (weight 0 in a merge).
    GQA: query head h uses kv head h // (H // K).
    """
    B, R, M, H, X = q_BRMHX.shape
    W, K = k_BRWKX.shape[2], k_BRWKX.shape[3]
    Q = H // K
    # kv-major layout with a kv head's Q query heads folded into the query axis, so
    # each (batch, block, kv head) is one plain matmul (faster on CPU than a 6-D einsum)
    q_BRKMX = q_BRMHX.reshape(B, R, M, K, Q, X).transpose(0, 1, 3, 4, 2, 5).reshape(B, R, K, -1, X)
    k_BRKWX, v_BRKWX = k_BRWKX.transpose(0, 1, 3, 2, 4), v_BRWKX.transpose(0, 1, 3, 2, 4)
    s_BRKMW = jnp.einsum("brkmx,brkwx->brkmw", q_BRKMX, k_BRKWX, preferred_element_type=jnp.float32)
    s_BRKQMW = s_BRKMW.reshape(B, R, K, Q, M, W) * (X**-0.5)
    P = mask_BRPMW.shape[2]
    if P == 1:
        mask = mask_BRPMW[:, :, :, None]  # [B, R, 1, 1, M, W]
    elif P == H:
        mask = mask_BRPMW.reshape(B, R, K, Q, M, W)
    else:
        raise ValueError(f"mask has {P} head rows; expected 1 or {H}")
    s_BRKQMW = jnp.where(mask, s_BRKQMW, NEG_INF)
    lse_BRKQM = jax.nn.logsumexp(s_BRKQMW, axis=-1)
    p_BRKQMW = jnp.exp(s_BRKQMW - lse_BRKQM[..., None])
    seen_BRKQM1 = jnp.any(mask, axis=-1, keepdims=True)
    p_BRKMW = jnp.where(seen_BRKQM1, p_BRKQMW, 0.0).astype(v_BRWKX.dtype).reshape(B, R, K, -1, W)
    o_BRKMX = jnp.einsum("brkmw,brkwx->brkmx", p_BRKMW, v_BRKWX, preferred_element_type=jnp.float32)
    o_BRMHX = o_BRKMX.reshape(B, R, K, Q, M, X).transpose(0, 1, 4, 2, 3, 5).reshape(B, R, M, H, X)
    lse_BRMH = lse_BRKQM.transpose(0, 1, 4, 2, 3).reshape(B, R, M, H)
    return o_BRMHX, lse_BRMH


def merge_partial(parts):
    """Combine (out, lse) pairs computed over disjoint key sets into one softmax's output."""
    outs, lses = zip(*parts, strict=True)
    lse = lses[0]
    for other in lses[1:]:
        lse = jnp.logaddexp(lse, other)
    return sum(o * jnp.exp(l_ - lse)[..., None] for o, l_ in zip(outs, lses, strict=True))


def masked_attention(q_BLHX, k_BTKX, v_BTKX, mask_BPLT) -> jax.Array:
    """Dense attention under an explicit [B, P, L, T] mask: the O(L*T) reference for tests."""
    o, _ = block_attention(q_BLHX[:, None], k_BTKX[:, None], v_BTKX[:, None], mask_BPLT[:, None])
    return o[:, 0].astype(q_BLHX.dtype)


def reference_attention(pattern, q_BLHX, k_BLKX, v_BLKX, pos_BL) -> jax.Array:
    """A pattern's attention the naive way: its full mask over every (query, key) pair."""
    return masked_attention(q_BLHX, k_BLKX, v_BLKX, pattern.mask(pos_BL, pos_BL))


def decode_attention(q_BHX, k_cache_BTKX, v_cache_BTKX, pos_B, pattern) -> jax.Array:
    """One decoding query per row over a contiguous KV cache, reading only needed positions.

    Row b's query sits at position pos_B[b] and the cache holds position t at
    index t (entries after pos_B[b] are ignored). Only the U positions of
    `pattern.needed_index` are gathered, so the cost is O(U), not O(T).
    """
    T = k_cache_BTKX.shape[1]
    idx_BU, valid_BU = pattern.needed_index(pos_B, T)
    take = lambda c: jnp.take_along_axis(c, idx_BU[:, :, None, None], axis=1)
    mask_BP1U = pattern.mask(pos_B[:, None], idx_BU) & valid_BU[:, None, None, :]
    o, _ = block_attention(
        q_BHX[:, None, None],
        take(k_cache_BTKX)[:, None],
        take(v_cache_BTKX)[:, None],
        mask_BP1U[:, None],
    )
    return o[:, 0, 0].astype(q_BHX.dtype)


def needed_pages(pattern, q_pos_B, max_len: int, page_size: int):
    """The KV pages (logical page numbers within each sequence) one decoding query needs.

    Returns (pages_BP int32, valid_BP bool) with P = min(ceil(max_len / page_size),
    U) a static bound; valid pages come first in ascending order, the rest repeat
    the query's own page. The engine maps these through its page table, gathers
    those pages only and applies `pattern.mask` to the positions they hold.
    """
    idx_BU, valid_BU = pattern.needed_index(q_pos_B, max_len)
    B, U = idx_BU.shape
    num_pages = -(-max_len // page_size)
    P = min(num_pages, U)
    rows_BU = jnp.broadcast_to(jnp.arange(B)[:, None], (B, U))
    hit_BP = jnp.zeros((B, num_pages), bool).at[rows_BU, idx_BU // page_size].max(valid_BU)
    order_BP = jnp.argsort(~hit_BP, axis=1, stable=True)[:, :P].astype(jnp.int32)
    valid_BP = jnp.take_along_axis(hit_BP, order_BP, axis=1)
    own_B1 = (jnp.maximum(q_pos_B, 0) // page_size)[:, None].astype(jnp.int32)
    return jnp.where(valid_BP, order_BP, own_B1), valid_BP


def fill_invalid(idx_BU, valid_BU, q_pos_B):
    """Invalid slots repeat the query's own position (always needed, always in range)."""
    own_B1 = jnp.maximum(q_pos_B, 0)[:, None]
    return jnp.where(valid_BU, idx_BU, own_B1).astype(jnp.int32), valid_BU
