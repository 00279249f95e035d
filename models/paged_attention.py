"""Paged attention kernels in pure JAX, and the storage of the paged KV cache.

The KV cache is one array per K and V, `[N layers, P pages, Z tokens per
page, K kv heads, X head dim]`; page 0 is a null page that padding writes
into. `paged_attention` reads each group's pages (`pages_GW`) up to its
context length, masked by the layer's attention pattern;
`gathered_decode_attention` reads only the keys a sparse pattern needs. Which
kernel a serving step uses for which group of queries is decided by its
attention context (`models/paged_context.py`). This module knows pages and
positions only; which request owns which page is the host's business.

Storage: a float32 cache holds float32 values. A bfloat16 cache is stored
*packed*: uint32 words of shape [N, P, Z, K, X / 2], word j holding head-dim
elements 2j (low half) and 2j + 1 (high half). XLA:CPU gathers 16-bit
elements inside loops about 30x slower than 32-bit ones; packed words gather
at full speed and unpack to float32 with two bit operations. Unpacking yields
the head dim permuted (evens, then odds); queries are permuted the same way,
which leaves q.k unchanged, and outputs are permuted back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.attention_core import NEG_INF

SMALL_QUERY_GROUP = 8  # query rows per kv head below which block-diagonal matmuls win


def cache_layout(head_dim: int, dtype) -> tuple[int, object]:
    """(last dim, storage dtype) of a cache holding `dtype` values."""
    if jnp.dtype(dtype) == jnp.bfloat16:
        if head_dim % 2:
            raise ValueError(f"a bfloat16 KV cache needs an even head_dim, got {head_dim}")
        return head_dim // 2, jnp.uint32
    return head_dim, jnp.float32


def is_packed(cache: jax.Array) -> bool:
    return cache.dtype == jnp.uint32


def pack(x_TKX: jax.Array) -> jax.Array:
    """bfloat16 pairs into uint32 words: element 2j in the low half, 2j + 1 in the high half."""
    bits = jax.lax.bitcast_convert_type(x_TKX.astype(jnp.bfloat16), jnp.uint16).astype(jnp.uint32)
    return bits[..., 0::2] | (bits[..., 1::2] << 16)


def unpack(w: jax.Array) -> jax.Array:
    """uint32 words to float32 values, head dim permuted to (evens, odds)."""
    low = jax.lax.bitcast_convert_type(w << 16, jnp.float32)
    high = jax.lax.bitcast_convert_type(w & jnp.uint32(0xFFFF0000), jnp.float32)
    return jnp.concatenate([low, high], axis=-1)


def evens_odds(x: jax.Array) -> jax.Array:
    return jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def interleave(x: jax.Array) -> jax.Array:
    """Inverse of evens_odds."""
    half = x.shape[-1] // 2
    return jnp.stack([x[..., :half], x[..., half:]], axis=-1).reshape(x.shape)


def _scores(q_GKMX, k_GTKX):
    """[G, K, M, T] scores. Few queries per kv head (decode): one block-diagonal matmul
    per group avoids transposing the gathered keys (a slow batched mat-vec on CPU)."""
    G, K, M, X = q_GKMX.shape
    T = k_GTKX.shape[1]
    if M <= SMALL_QUERY_GROUP:
        eye = jnp.eye(K, dtype=q_GKMX.dtype)
        q_bd = jnp.einsum("gkmx,kj->gkxjm", q_GKMX, eye).reshape(G, K * X, K * M)
        s = jnp.matmul(k_GTKX.reshape(G, T, K * X), q_bd, preferred_element_type=jnp.float32)
        return s.reshape(G, T, K, M).transpose(0, 2, 3, 1)
    k_GKTX = k_GTKX.transpose(0, 2, 1, 3)
    return jnp.einsum("gkmx,gktx->gkmt", q_GKMX, k_GKTX, preferred_element_type=jnp.float32)


def _weighted_values(p_GKMT, v_GTKX):
    """[G, K, M, X] = sum_t p * v, in the matmul form that suits the query count."""
    G, K, M, T = p_GKMT.shape
    X = v_GTKX.shape[-1]
    if M <= SMALL_QUERY_GROUP:
        p_GMT = p_GKMT.reshape(G, K * M, T)
        o = jnp.matmul(p_GMT, v_GTKX.reshape(G, T, K * X), preferred_element_type=jnp.float32)
        return jnp.einsum("gkmjx,kj->gkmx", o.reshape(G, K, M, K, X), jnp.eye(K, dtype=o.dtype))
    v_GKTX = v_GTKX.transpose(0, 2, 1, 3)
    return jnp.einsum("gkmt,gktx->gkmx", p_GKMT, v_GKTX, preferred_element_type=jnp.float32)


def paged_attention(
    q_GLHX: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    pages_GW: jax.Array,
    q_pos_GL: jax.Array,
    kv_len_G: jax.Array,
    pattern,
    chunk_pages: int = 8,
    layer: int | None = None,
    tree_GLL: jax.Array | None = None,
    tree_base_G: jax.Array | None = None,
) -> jax.Array:
    """Attention of G query groups over their paged context; f32 online softmax.

    `k_cache`/`v_cache` are [P, Z, K, X], or the whole [N, P, Z, K, X] cache with
    `layer` given (gathering `cache[layer, pages]` in one indexing op is several
    times faster on CPU than slicing the layer first). Key j of a group (position
    j < W * Z) is visible to query i when j < kv_len and the pattern allows
    (q_pos_i, j). The context is read in chunks of `chunk_pages` pages inside a
    loop whose trip count is set by the longest context in the batch at run time,
    so the table width W is not a compile-time bucket and no step reads more KV
    than its longest context needs. Queries with no visible key return zeros.

    A token tree (speculative verification, SpecInfer): with `tree_GLL`, the L queries of
    group g are nodes whose keys sit at positions tree_base[g] + l, and a key there is
    visible to query i exactly when `tree_GLL[g, i, l]` (node l is i or an ancestor of it);
    keys before the tree follow the pattern at the queries' own positions `q_pos_GL` (the
    node's depth past the context, as RoPE has them).
    """
    k_cache, v_cache = jnp.asarray(k_cache), jnp.asarray(v_cache)
    pages_GW, q_pos_GL, kv_len_G = map(jnp.asarray, (pages_GW, q_pos_GL, kv_len_G))
    packed = is_packed(k_cache)
    out_dtype = q_GLHX.dtype
    if packed:  # compute in float32 on unpacked values, head dim in (evens, odds) order
        q_GLHX = evens_odds(q_GLHX.astype(jnp.float32))
    G, L, H, X = q_GLHX.shape
    Z, K = k_cache.shape[-3], k_cache.shape[-2]
    W = pages_GW.shape[1]
    Q, M = H // K, (H // K) * L
    cp = min(chunk_pages, W)
    n_total = -(-W // cp)
    pages_GNC = jnp.pad(pages_GW, ((0, 0), (0, n_total * cp - W))).reshape(G, n_total, cp)
    q_GKMX = q_GLHX.reshape(G, L, K, Q, X).transpose(0, 2, 3, 1, 4).reshape(G, K, M, X)
    q_GKMX = q_GKMX * jnp.asarray(X**-0.5, q_GKMX.dtype)
    chunk = cp * Z
    n_chunks = jnp.minimum((jnp.max(kv_len_G) + chunk - 1) // chunk, n_total)

    def gather(cache, pg_GC):
        got = cache[pg_GC] if layer is None else cache[layer, pg_GC]
        got = unpack(got) if packed else got
        return got.reshape(G, chunk, K, X)

    def body(i, carry):
        m_GKM, l_GKM, acc_GKMX = carry
        pg_GC = jax.lax.dynamic_index_in_dim(pages_GNC, i, axis=1, keepdims=False)
        k_GTKX, v_GTKX = gather(k_cache, pg_GC), gather(v_cache, pg_GC)
        k_pos_GT = jnp.broadcast_to(i * chunk + jnp.arange(chunk, dtype=jnp.int32), (G, chunk))
        ok_GPLT = pattern.mask(q_pos_GL, k_pos_GT) & (k_pos_GT < kv_len_G[:, None])[:, None, None]
        if tree_GLL is not None:  # keys inside the tree: its ancestors, whatever the pattern
            rel_GT = k_pos_GT - tree_base_G[:, None]
            inside_GT = (rel_GT >= 0) & (rel_GT < L)
            idx = jnp.broadcast_to(jnp.clip(rel_GT, 0, L - 1)[:, None, :], (G, L, chunk))
            seen_GLT = jnp.take_along_axis(tree_GLL, idx, axis=2)
            live_GT = k_pos_GT < kv_len_G[:, None]
            ok_GPLT = jnp.where(inside_GT[:, None, None], (seen_GLT & live_GT[:, None])[:, None],
                                ok_GPLT)  # fmt: skip
        if ok_GPLT.shape[1] == H:  # per-head pattern
            ok = ok_GPLT.reshape(G, K, Q, L, chunk).reshape(G, K, M, chunk)
        else:
            ok = jnp.broadcast_to(ok_GPLT[:, :, None], (G, 1, Q, L, chunk)).reshape(G, 1, M, chunk)
        s = jnp.where(ok, _scores(q_GKMX, k_GTKX), NEG_INF)
        m_new = jnp.maximum(m_GKM, jnp.max(s, axis=-1))
        p = jnp.where(ok, jnp.exp(s - m_new[..., None]), 0.0)
        scale = jnp.exp(m_GKM - m_new)
        pv = _weighted_values(p.astype(v_GTKX.dtype), v_GTKX)
        return m_new, l_GKM * scale + jnp.sum(p, axis=-1), acc_GKMX * scale[..., None] + pv

    init = (
        jnp.full((G, K, M), NEG_INF, jnp.float32),
        jnp.zeros((G, K, M), jnp.float32),
        jnp.zeros((G, K, M, X), jnp.float32),
    )
    _, l_GKM, acc_GKMX = jax.lax.fori_loop(0, n_chunks, body, init)
    o_GKMX = acc_GKMX / jnp.maximum(l_GKM, 1e-30)[..., None]
    o_GLHX = o_GKMX.reshape(G, K, Q, L, X).transpose(0, 3, 1, 2, 4).reshape(G, L, H, X)
    if packed:
        o_GLHX = interleave(o_GLHX)
    return o_GLHX.astype(out_dtype)


def gathered_decode_attention(
    q_GHX: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: int,
    pages_GW: jax.Array,
    q_pos_G: jax.Array,
    kv_len_G: jax.Array,
    pattern,
) -> jax.Array:
    """One decoding query per group, reading only the key positions its pattern needs.

    For a sparse pattern, `pattern.needed_index` gives the (statically bounded)
    positions each query needs; they are mapped through the page table and
    gathered from the pages they live in, instead of reading the whole context.
    """
    packed = is_packed(k_cache)
    out_dtype = q_GHX.dtype
    q_GHX = evens_odds(q_GHX.astype(jnp.float32)) if packed else q_GHX
    G, H, X = q_GHX.shape
    Z, K = k_cache.shape[-3], k_cache.shape[-2]
    Q = H // K
    W = pages_GW.shape[1]
    idx_GU, valid_GU = pattern.needed_index(q_pos_G, W * Z)
    page_GU = jnp.take_along_axis(pages_GW, idx_GU // Z, axis=1)

    def gather(cache):
        got = cache[layer, page_GU, idx_GU % Z]
        return unpack(got) if packed else got

    k_GUKX, v_GUKX = gather(k_cache), gather(v_cache)
    ok_GPU = (
        pattern.mask(q_pos_G[:, None], idx_GU)[:, :, 0]
        & (valid_GU & (idx_GU < kv_len_G[:, None]))[:, None]
    )
    ok = ok_GPU.reshape(G, K, Q, -1) if ok_GPU.shape[1] == H else ok_GPU[:, :, None]
    q_GKQX = q_GHX.reshape(G, K, Q, X) * jnp.asarray(X**-0.5, q_GHX.dtype)
    s = jnp.where(ok, _scores(q_GKQX, k_GUKX), NEG_INF)
    p = jnp.where(ok, jnp.exp(s - jnp.max(s, axis=-1, keepdims=True)), 0.0)
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    o_GHX = _weighted_values(p.astype(v_GUKX.dtype), v_GUKX).reshape(G, H, X)
    return (interleave(o_GHX) if packed else o_GHX).astype(out_dtype)
