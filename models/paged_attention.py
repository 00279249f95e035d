"""Paged attention: the serving engine's attention context over a paged KV cache.

The KV cache is one array per K and V, `[N layers, P pages, Z tokens per
page, K kv heads, X head dim]`; page 0 is a null page that padding writes
into. A step's tokens are flat (`x_TD`); the context knows, per token, where
its K and V go (`write_page_T`, `write_offset_T`), and which *groups* of
queries read which pages:

- the decode group: G = D slots, one query each, the first D tokens;
- the prefill group: R rows of up to C consecutive tokens of one sequence,
  gathered from the remaining tokens by `pre_index_RC`.

Each group reads the pages of its page table (`pages_GW`) up to its context
length, masked by the layer's attention pattern. This module
knows pages and positions only; which request owns which page is the host's
business.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from models.attention_core import NEG_INF


def paged_attention(
    q_GLHX: jax.Array,
    k_cache_PZKX: jax.Array,
    v_cache_PZKX: jax.Array,
    pages_GW: jax.Array,
    q_pos_GL: jax.Array,
    kv_len_G: jax.Array,
    pattern,
    chunk_pages: int = 8,
) -> jax.Array:
    """Attention of G query groups over their paged context; f32 online softmax.

    Key j of a group (position j < W * Z) is visible to query i when j < kv_len
    and the pattern allows (q_pos_i, j). The context is read in chunks of
    `chunk_pages` pages inside a loop whose trip count is set by the longest
    context in the batch at run time, so the table width W is not a compile-time
    bucket and no step gathers more KV than its longest context needs. Queries
    with no visible key (padding) return zeros.
    """
    k_cache_PZKX, v_cache_PZKX = jnp.asarray(k_cache_PZKX), jnp.asarray(v_cache_PZKX)
    pages_GW, q_pos_GL, kv_len_G = map(jnp.asarray, (pages_GW, q_pos_GL, kv_len_G))
    G, L, H, X = q_GLHX.shape
    _, Z, K, _ = k_cache_PZKX.shape
    W = pages_GW.shape[1]
    Q = H // K
    cp = min(chunk_pages, W)
    n_total = -(-W // cp)
    pages_GNC = jnp.pad(pages_GW, ((0, 0), (0, n_total * cp - W))).reshape(G, n_total, cp)
    q_GKQLX = q_GLHX.reshape(G, L, K, Q, X).transpose(0, 2, 3, 1, 4)
    chunk = cp * Z
    n_chunks = jnp.minimum((jnp.max(kv_len_G) + chunk - 1) // chunk, n_total)

    def body(i, carry):
        m_GKQL, l_GKQL, acc_GKQLX = carry
        pg_GC = jax.lax.dynamic_index_in_dim(pages_GNC, i, axis=1, keepdims=False)
        k_GTKX = k_cache_PZKX[pg_GC].reshape(G, chunk, K, X)
        v_GTKX = v_cache_PZKX[pg_GC].reshape(G, chunk, K, X)
        k_pos_GT = jnp.broadcast_to(i * chunk + jnp.arange(chunk, dtype=jnp.int32), (G, chunk))
        ok_GPLT = pattern.mask(q_pos_GL, k_pos_GT) & (k_pos_GT < kv_len_G[:, None])[:, None, None]
        ok = ok_GPLT.reshape(G, K, Q, L, chunk) if ok_GPLT.shape[1] == H else ok_GPLT[:, :, None]
        s = jnp.einsum("gkqlx,gtkx->gkqlt", q_GKQLX, k_GTKX, preferred_element_type=jnp.float32)
        s = jnp.where(ok, s * (X**-0.5), NEG_INF)
        m_new = jnp.maximum(m_GKQL, jnp.max(s, axis=-1))
        p = jnp.where(ok, jnp.exp(s - m_new[..., None]), 0.0)
        scale = jnp.exp(m_GKQL - m_new)
        l_new = l_GKQL * scale + jnp.sum(p, axis=-1)
        pv = jnp.einsum(
            "gkqlt,gtkx->gkqlx", p.astype(v_GTKX.dtype), v_GTKX, preferred_element_type=jnp.float32
        )
        return m_new, l_new, acc_GKQLX * scale[..., None] + pv

    init = (
        jnp.full((G, K, Q, L), NEG_INF, jnp.float32),
        jnp.zeros((G, K, Q, L), jnp.float32),
        jnp.zeros((G, K, Q, L, X), jnp.float32),
    )
    _, l_GKQL, acc_GKQLX = jax.lax.fori_loop(0, n_chunks, body, init)
    o_GKQLX = acc_GKQLX / jnp.maximum(l_GKQL, 1e-30)[..., None]
    return o_GKQLX.transpose(0, 3, 1, 2, 4).reshape(G, L, H, X).astype(q_GLHX.dtype)


@dataclasses.dataclass
class PagedContext:
    """Attention context for one serving step; `k`, `v` are replaced as layers write."""

    k: jax.Array  # [N, P, Z, K, X]
    v: jax.Array
    positions_T: jax.Array  # [T]
    write_page_T: jax.Array  # [T]
    write_offset_T: jax.Array  # [T]
    dec_pages_DW: jax.Array  # [D, W]
    dec_len_D: jax.Array  # [D] context length incl. this token; 0 for padding slots
    pre_index_RC: jax.Array | None = None  # [R, C] index into the prefill tokens; pad = Tp
    pre_pages_RW: jax.Array | None = None  # [R, W]
    pre_len_R: jax.Array | None = None  # [R]
    mode: str = "serve"
    chunk_pages: int = 8

    @property
    def num_decode(self) -> int:
        return self.dec_pages_DW.shape[0]

    def attend(self, layer: int, pattern, q_THX, k_TKX, v_TKX) -> jax.Array:
        self.k = self.k.at[layer, self.write_page_T, self.write_offset_T].set(
            k_TKX.astype(self.k.dtype)
        )
        self.v = self.v.at[layer, self.write_page_T, self.write_offset_T].set(
            v_TKX.astype(self.v.dtype)
        )
        k_layer, v_layer = self.k[layer], self.v[layer]
        D = self.num_decode
        q_THX = q_THX.astype(self.k.dtype)
        outs = []
        if D:
            q_pos = self.positions_T[:D, None]
            o = paged_attention(
                q_THX[:D, None],
                k_layer,
                v_layer,
                self.dec_pages_DW,
                q_pos,
                self.dec_len_D,
                pattern,
                self.chunk_pages,
            )
            outs.append(o[:, 0])
        if self.pre_index_RC is not None:
            R, C = self.pre_index_RC.shape
            q_pre = q_THX[D:]
            Tp = q_pre.shape[0]
            q_pad = jnp.concatenate([q_pre, jnp.zeros_like(q_pre[:1])])  # row Tp: padding
            pos_pad = jnp.concatenate([self.positions_T[D:], jnp.zeros((1,), jnp.int32)])
            o_RCHX = paged_attention(
                q_pad[self.pre_index_RC],
                k_layer,
                v_layer,
                self.pre_pages_RW,
                pos_pad[self.pre_index_RC],
                self.pre_len_R,
                pattern,
                self.chunk_pages,
            )
            # scatter rows back to packed token order (padding cells go to the dummy row Tp)
            flat = jnp.zeros((Tp + 1, *o_RCHX.shape[2:]), o_RCHX.dtype)
            flat = flat.at[self.pre_index_RC.reshape(-1)].set(
                o_RCHX.reshape(R * C, *o_RCHX.shape[2:])
            )
            outs.append(flat[:Tp])
        return jnp.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]
