"""Paged attention: the serving engine's attention context over a paged KV cache.

The KV cache is one array per K and V, `[N layers, P pages, Z tokens per
page, K kv heads, X head dim]`; page 0 is a null page that padding writes
into. A step's tokens are flat (`x_TD`); the context knows, per token, where
its K and V go (`write_page_T`, `write_offset_T`), and which *groups* of
queries read which pages:

- the decode group: G = D slots of `dec_width` (L) consecutive queries each, the
  first D * L tokens (L = 1: one query per slot, with the native kernel as
  its fast path; L > 1: a sequence verifying draft tokens, each query seeing
  the context up to its own position);
- the prefill group: R rows of up to C consecutive tokens of one sequence,
  gathered from the remaining tokens by `pre_index_RC`.

Each group reads the pages of its page table (`pages_GW`) up to its context
length, masked by the layer's attention pattern. This module
knows pages and positions only; which request owns which page is the host's
business.

Storage: a float32 cache holds float32 values. A bfloat16 cache is stored
*packed*: uint32 words of shape [N, P, Z, K, X / 2], word j holding head-dim
elements 2j (low half) and 2j + 1 (high half). XLA:CPU gathers 16-bit
elements inside loops about 30x slower than 32-bit ones; packed words gather
at full speed and unpack to float32 with two bit operations. Unpacking yields
the head dim permuted (evens, then odds); queries are permuted the same way,
which leaves q.k unchanged, and outputs are permuted back.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from models.attention_core import NEG_INF
from models.patterns import DenseCausal

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


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """How paged attention runs: context chunk size; whether the native CPU decode kernel
    (models/native_kernels.py) replaces the pure-JAX one for dense decode groups; which Pallas
    kernel flavour, "tpu" or "gpu" (models/pallas_attention.py), replaces it for every dense
    group, decode and prefill ("": none), and whether that kernel is interpreted (CPU tests)."""

    chunk_pages: int = 8
    native: bool = False
    pallas: str = ""
    interpret: bool = False

    def __post_init__(self):
        if self.pallas not in ("", "tpu", "gpu"):
            raise ValueError(f"pallas must be '', 'tpu' or 'gpu', got {self.pallas!r}")


@dataclasses.dataclass
class PagedContext:
    """Attention context for one serving step; `k`, `v` are replaced as layers write."""

    k: jax.Array  # [N, P, Z, K, X]
    v: jax.Array
    positions_T: jax.Array  # [T]
    write_page_T: jax.Array  # [T]
    write_offset_T: jax.Array  # [T]
    dec_pages_DW: jax.Array  # [D, W]
    dec_len_D: jax.Array  # [D] context length incl. this step's tokens; 0 for padding slots
    pre_index_RC: jax.Array | None = None  # [R, C] index into the prefill tokens; pad = Tp
    pre_pages_RW: jax.Array | None = None  # [R, W]
    pre_len_R: jax.Array | None = None  # [R]
    mode: str = "serve"
    kernel: KernelOptions = KernelOptions()
    dec_width: int = 1  # L: consecutive query positions per decode slot

    @property
    def chunk_pages(self) -> int:
        return self.kernel.chunk_pages

    @property
    def num_decode(self) -> int:
        return self.dec_pages_DW.shape[0]

    def _native_prefill(self, layer: int, q_pre: jax.Array) -> jax.Array:
        """Dense causal attention of the prefill tokens on the native kernel: token t of row r
        is one query over r's pages up to its own position (its KV is already written), a
        row's consecutive tokens in blocks that read its pages once. Rows of `pre_index_RC`
        hold only their own tokens, so no work is padded to R x C, and the kernel reads the
        pages in place."""
        from models import native_kernels

        R, C = self.pre_index_RC.shape
        Tp = q_pre.shape[0]
        cells = self.pre_index_RC.reshape(-1)  # padding cells point at the dummy slot Tp
        row_T = jnp.zeros((Tp + 1,), jnp.int32).at[cells].set(jnp.repeat(jnp.arange(R), C))[:Tp]
        used_T = jnp.zeros((Tp + 1,), bool).at[cells].set(True)[:Tp]
        kv_len_T = jnp.where(used_T, self.positions_T[-Tp:] + 1, 0)
        o = native_kernels.paged_prefill(
            q_pre, self.k, self.v, self.pre_pages_RW, row_T, kv_len_T, layer
        )
        return o.astype(q_pre.dtype)

    def _native_multi(self, layer: int, q_dec: jax.Array) -> jax.Array:
        """Decode slots of L > 1 positions (a sequence verifying drafts) on the native prefill
        kernel: query j of slot d sees its slot's pages up to its own position, exactly as
        the decode kernel computes a single query. Queries past a slot's length (and padding
        slots, length 0) give zeros or are discarded."""
        from models import native_kernels

        D, L = self.num_decode, self.dec_width
        pos_T = self.positions_T[: D * L]
        row_T = jnp.repeat(jnp.arange(D, dtype=jnp.int32), L)
        kv_len_T = jnp.where(pos_T < self.dec_len_D[row_T], pos_T + 1, 0)
        o = native_kernels.paged_prefill(
            q_dec, self.k, self.v, self.dec_pages_DW, row_T, kv_len_T, layer
        )
        return o.astype(q_dec.dtype)

    def attend(self, layer: int, pattern, q_THX, k_TKX, v_TKX) -> jax.Array:
        store = pack if is_packed(self.k) else (lambda x: x.astype(self.k.dtype))
        self.k = self.k.at[layer, self.write_page_T, self.write_offset_T].set(store(k_TKX))
        self.v = self.v.at[layer, self.write_page_T, self.write_offset_T].set(store(v_TKX))
        D, L = self.num_decode, self.dec_width
        outs = []
        pallas = None
        if self.kernel.pallas and isinstance(pattern, DenseCausal):  # every dense group
            from models import pallas_attention

            pallas = functools.partial(
                pallas_attention.paged_attention,
                k_cache=self.k,
                v_cache=self.v,
                layer=layer,
                flavour=self.kernel.pallas,
                interpret=self.kernel.interpret,
            )
        if D and pallas:
            H, X = q_THX.shape[1:]
            o = pallas(
                q_THX[: D * L].reshape(D, L, H, X),
                pages_GW=self.dec_pages_DW,
                q_pos_GL=self.positions_T[: D * L].reshape(D, L),
                kv_len_G=self.dec_len_D,
            )
            outs.append(o.reshape(D * L, H, X))
        elif D and L > 1 and self.kernel.native and isinstance(pattern, DenseCausal):
            outs.append(self._native_multi(layer, q_THX[: D * L]))
        elif D and L > 1:  # several queries per slot: causal by position within the slot
            H, X = q_THX.shape[1:]
            o = paged_attention(
                q_THX[: D * L].reshape(D, L, H, X),
                self.k,
                self.v,
                self.dec_pages_DW,
                self.positions_T[: D * L].reshape(D, L),
                self.dec_len_D,
                pattern,
                self.chunk_pages,
                layer,
            )
            outs.append(o.reshape(D * L, H, X))
        elif D and not isinstance(pattern, DenseCausal):  # sparse: read only the needed keys
            outs.append(
                gathered_decode_attention(
                    q_THX[:D],
                    self.k,
                    self.v,
                    layer,
                    self.dec_pages_DW,
                    self.positions_T[:D],
                    self.dec_len_D,
                    pattern,
                )
            )
        elif D and self.kernel.native:  # reads pages in place: no gathered copy
            from models import native_kernels

            o = native_kernels.paged_decode(
                q_THX[:D], self.k, self.v, self.dec_pages_DW, self.dec_len_D, layer
            )
            outs.append(o.astype(q_THX.dtype))
        elif D:
            q_pos = self.positions_T[:D, None]
            o = paged_attention(
                q_THX[:D, None],
                self.k,
                self.v,
                self.dec_pages_DW,
                q_pos,
                self.dec_len_D,
                pattern,
                self.chunk_pages,
                layer,
            )
            outs.append(o[:, 0])
        native_prefill = self.kernel.native and not pallas and isinstance(pattern, DenseCausal)
        if self.pre_index_RC is not None and native_prefill:  # a token: one decode query
            outs.append(self._native_prefill(layer, q_THX[D * L :]))
        elif self.pre_index_RC is not None:
            R, C = self.pre_index_RC.shape
            q_pre = q_THX[D * L :]
            Tp = q_pre.shape[0]
            q_pad = jnp.concatenate([q_pre, jnp.zeros_like(q_pre[:1])])  # row Tp: padding
            pos_pad = jnp.concatenate([self.positions_T[D * L :], jnp.zeros((1,), jnp.int32)])
            if pallas:
                o_RCHX = pallas(
                    q_pad[self.pre_index_RC],
                    pages_GW=self.pre_pages_RW,
                    q_pos_GL=pos_pad[self.pre_index_RC],
                    kv_len_G=self.pre_len_R,
                )
            else:
                o_RCHX = paged_attention(
                    q_pad[self.pre_index_RC],
                    self.k,
                    self.v,
                    self.pre_pages_RW,
                    pos_pad[self.pre_index_RC],
                    self.pre_len_R,
                    pattern,
                    self.chunk_pages,
                    layer,
                )
            # scatter rows back to packed token order (padding cells go to the dummy row Tp)
            flat = jnp.zeros((Tp + 1, *o_RCHX.shape[2:]), o_RCHX.dtype)
            flat = flat.at[self.pre_index_RC.reshape(-1)].set(
                o_RCHX.reshape(R * C, *o_RCHX.shape[2:])
            )
            outs.append(flat[:Tp])
        return jnp.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]
