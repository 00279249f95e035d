"""Paged attention as a Pallas kernel: dense causal attention of query groups over their pages.

Same meaning as `models.paged_attention.paged_attention` for a dense causal layer:
G groups of L queries (a decode slot, or a prefill row of a ragged batch:
padding cells included), each reading its page table `pages_GW` up to its
context length `kv_len_G`; key j is visible to query i when j < kv_len and
j <= q_pos_i; a query with no visible key returns zeros. The softmax is the
same f32 online softmax over pages, one page per loop step, and each group
stops at its own last page (the pure-JAX kernel runs every group to the
batch's longest context).

Which kernel. jax 0.10.2 ships `pallas.ops.tpu.ragged_paged_attention` (the
vLLM-TPU kernel) and `pallas.ops.gpu.paged_attention` (Triton, decode only),
and neither fits: the TPU kernel runs in neither interpret mode on CPU (TPU
interpret mode rejects its `ref.reshape`; the generic interpreter rejects its
scalar-ref store), needs head_dim % 128 == 0, and reads K and V interleaved
in one [P, Z, 2K, X] array, which would mean copying the whole layer cache
into that layout at every layer of every step; the GPU kernel wants
[K, P, Z, X] (the same whole-layer copy) and has no prefill. So this module
has its own kernel, reading our cache `[N, P, Z, K, X']` (X' = X, or X / 2
packed bf16 words) in place, one kernel body with two ways to fetch a page:

- flavour "tpu" (Mosaic): grid (G,); the page table and lengths are scalar
  prefetch (SMEM); each page [Z, K, X'] is DMA'd from HBM into a
  double-buffered VMEM scratch while the previous one is used; all K kv
  heads are done per page;
- flavour "gpu" (Triton): grid (G, K); each program reads its head's [Z, X']
  slab straight from the cache by page number.

Layout adaptation. Only the queries move: q [G, L, H, X] is scaled, cast to
f32 and regrouped to [G, K, M = L * Q, X] (per kv head, its Q query heads
at each of the L positions; Q = H / K), with positions repeated to
[G, M, 1]; the output is regrouped back. That is O(G L H X), against the
O(P Z K X) of relaying the cache out. A packed bf16 cache stays packed: the
kernel unpacks words to f32 (two bit operations, as the pure-JAX kernel
does), so the head dim comes out as (evens, odds); queries are split into
their even and odd halves to match, scores add the two half products, and
the two output halves are interleaved back. Arithmetic is f32 (HIGHEST
precision) to match the pure-JAX kernel; a bf16 MXU path is a tuning left
open.

Constraints (`unsupported`): tpu: page size a multiple of 8 (sublane
tiling); gpu: page size and stored head dim powers of two >= 16 (Triton's
block and dot shapes; query rows and table width are padded to powers of two
here). Both cache layouts (f32, packed bf16) are read. The runner checks
these once, at construction, and falls back to pure JAX with a warning; it
uses the kernel on a single-device mesh only (a pallas_call has no
partitioning rule; sharded meshes keep pure JAX).

Tested where: CPU only (tests/test_pallas_attention.py). Both flavours run in
interpret mode (`interpret=True`: TPU interpret mode, which simulates the
DMAs and semaphores, for "tpu"; the HLO interpreter for "gpu") and equal the
pure-JAX kernel; both lower, through jax.export, to Mosaic and Triton IR.
Nothing has been compiled by the TPU or GPU compiler or run on a TPU or GPU:
what Mosaic and Triton accept past Pallas's own lowering (e.g. the strided
[Z, X'] read of one kv head from a VMEM page, dots of a few query rows) and
the speed are unverified. Known costs, untuned: one page per loop step (the
TPU flavour's DMAs are page-sized, and each group's first page is not
prefetched); f32 HIGHEST matmuls (several MXU passes on a TPU); on a GPU no
split over the context, so few sequences fill few SMs.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from models.attention_core import NEG_INF
from models.paged_attention import cache_layout, evens_odds, interleave, is_packed

FLAVOURS = ("tpu", "gpu")
GPU_MIN_DIM = 16  # Triton's smallest dot operand dimension


def _pow2_at_least(n: int, low: int = 1) -> int:
    return max(low, 1 << max(n - 1, 0).bit_length())


def unsupported(flavour: str, page_size: int, head_dim: int, dtype) -> str | None:
    """Why the kernel cannot run for a cache of `dtype` values on this backend, or None.
    Every cache layout (`cache_layout`: f32, or bf16 packed in uint32 pairs) is supported."""
    stored = cache_layout(head_dim, dtype)[0]
    if flavour == "tpu":
        return None if page_size % 8 == 0 else f"page_size {page_size} is not a multiple of 8"
    if flavour == "gpu":
        for name, n in (("page_size", page_size), ("stored head dim", stored)):
            if n < GPU_MIN_DIM or n & (n - 1):
                return f"{name} {n} is not a power of two >= {GPU_MIN_DIM}"
        return None
    return f"no Pallas kernel for backend {flavour!r}"


def flavour_for(backend: str, page_size: int, head_dim: int, dtype) -> str:
    """The kernel flavour to serve with on `backend` ("": pure JAX), warning when the cache
    rules the kernel out."""
    if backend not in FLAVOURS:
        return ""
    why = unsupported(backend, page_size, head_dim, dtype)
    if why:
        logging.warning(
            "Pallas paged attention unavailable on %s, using pure JAX: %s", backend, why
        )
        return ""
    return backend


# -- the kernel body, shared by both flavours ----------------------------------------------


def _halves(w):
    """Stored values to f32 parts: (x,) for f32, (evens, odds) for packed bf16 words."""
    if w.dtype != jnp.uint32:
        return (w.astype(jnp.float32),)
    low = jax.lax.bitcast_convert_type(w << 16, jnp.float32)
    high = jax.lax.bitcast_convert_type(w & jnp.uint32(0xFFFF0000), jnp.float32)
    return low, high


def _dot(a, b, trans_b=False):
    """[M, C] x [C, N] (or [N, C] with trans_b), f32 at full precision (no TF32 on a GPU)."""
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(
        a, b, dims, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32
    )


def _attend_pages(q_heads, pos_M1, kv_len, n_pages, Z, fetch):
    """Online softmax over pages 0..n_pages-1. q_heads: per kv head, its f32 query parts
    [M, X']; fetch(i) gives, per kv head, the page's (key parts, value parts) [Z, X']."""
    M = pos_M1.shape[0]

    def body(i, carry):
        k_pos_1Z = i * Z + jax.lax.broadcasted_iota(jnp.int32, (1, Z), 1)
        ok_MZ = (k_pos_1Z <= pos_M1) & (k_pos_1Z < kv_len)
        out = []
        for (m, l, acc), q_parts, (k_parts, v_parts) in zip(carry, q_heads, fetch(i), strict=True):
            s = sum(_dot(q, k, trans_b=True) for q, k in zip(q_parts, k_parts, strict=True))
            s = jnp.where(ok_MZ, s, NEG_INF)
            m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
            p = jnp.where(ok_MZ, jnp.exp(s - m_new), 0.0)
            scale = jnp.exp(m - m_new)
            acc = tuple(a * scale + _dot(p, v) for a, v in zip(acc, v_parts, strict=True))
            out.append((m_new, l * scale + jnp.sum(p, axis=1, keepdims=True), acc))
        return out

    init = [
        (
            jnp.full((M, 1), NEG_INF, jnp.float32),
            jnp.zeros((M, 1), jnp.float32),
            tuple(jnp.zeros(q.shape, jnp.float32) for q in q_parts),
        )
        for q_parts in q_heads
    ]
    final = jax.lax.fori_loop(0, n_pages, body, init)
    return [tuple(a / jnp.maximum(l, 1e-30) for a in acc) for _, l, acc in final]


def _num_pages(kv_len, Z: int, W: int):
    return jnp.minimum((kv_len + Z - 1) // Z, W)


def _tpu_kernel(pages_ref, lens_ref, *refs, layer: int, n_parts: int):
    q_refs, pos_ref = refs[:n_parts], refs[n_parts]
    k_hbm, v_hbm = refs[n_parts + 1 : n_parts + 3]
    o_refs = refs[n_parts + 3 : 2 * n_parts + 3]
    k_buf, v_buf, sems = refs[2 * n_parts + 3 :]
    _, Z, K, _ = k_buf.shape
    g = pl.program_id(0)
    kv_len = lens_ref[g]
    n = _num_pages(kv_len, Z, pages_ref.shape[1])

    def copies(i, slot):
        page = pages_ref[g, i]
        return [
            pltpu.make_async_copy(src.at[layer, page], buf.at[slot], sems.at[j, slot])
            for j, (src, buf) in enumerate(((k_hbm, k_buf), (v_hbm, v_buf)))
        ]

    @pl.when(n > 0)
    def _():
        for c in copies(0, 0):
            c.start()

    def fetch(i):
        slot = i % 2

        @pl.when(i + 1 < n)
        def _():
            for c in copies(i + 1, 1 - slot):
                c.start()

        for c in copies(i, slot):
            c.wait()
        return [(_halves(k_buf[slot, :, h, :]), _halves(v_buf[slot, :, h, :])) for h in range(K)]

    q_heads = [tuple(r[h] for r in q_refs) for h in range(K)]
    outs = _attend_pages(q_heads, pos_ref[...], kv_len, n, Z, fetch)
    for h, parts in enumerate(outs):
        for o_ref, o in zip(o_refs, parts, strict=True):
            o_ref[h] = o


def _gpu_kernel(pages_ref, lens_ref, *refs, layer: int, n_parts: int, Z: int):
    q_refs, pos_ref = refs[:n_parts], refs[n_parts]
    k_ref, v_ref = refs[n_parts + 1 : n_parts + 3]
    o_refs = refs[n_parts + 3 :]
    h = pl.program_id(1)
    kv_len = lens_ref[0]
    n = _num_pages(kv_len, Z, pages_ref.shape[0])

    def fetch(i):
        page = pages_ref[i]
        return [(_halves(k_ref[layer, page, :, h, :]), _halves(v_ref[layer, page, :, h, :]))]

    q_parts = tuple(r[...] for r in q_refs)
    (parts,) = _attend_pages([q_parts], pos_ref[...], kv_len, n, Z, fetch)
    for o_ref, o in zip(o_refs, parts, strict=True):
        o_ref[...] = o


# -- the call ------------------------------------------------------------------------------


def _call_tpu(q_parts, pos_GM1, k_cache, v_cache, layer, pages_GW, kv_len_G, interpret):
    G, K, M, _ = q_parts[0].shape
    _, _, Z, _, last = k_cache.shape
    n_parts = len(q_parts)
    q_spec = pl.BlockSpec((None, *q_parts[0].shape[1:]), lambda g, *_: (g, 0, 0, 0))
    pos_spec = pl.BlockSpec((None, M, 1), lambda g, *_: (g, 0, 0))
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    buf = pltpu.VMEM((2, Z, K, last), k_cache.dtype)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(G,),
        in_specs=[q_spec] * n_parts + [pos_spec, any_spec, any_spec],
        out_specs=[q_spec] * n_parts,
        scratch_shapes=[buf, buf, pltpu.SemaphoreType.DMA((2, 2))],
    )
    return pl.pallas_call(
        functools.partial(_tpu_kernel, layer=layer, n_parts=n_parts),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(q.shape, jnp.float32) for q in q_parts],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="mlx_paged_attention",
    )(pages_GW, kv_len_G, *q_parts, pos_GM1, k_cache, v_cache)


def _call_gpu(q_parts, pos_GM1, k_cache, v_cache, layer, pages_GW, kv_len_G, interpret):
    G, K, M, last = q_parts[0].shape
    Z = k_cache.shape[2]
    W = pages_GW.shape[1]
    Mp, Wp = _pow2_at_least(M, GPU_MIN_DIM), _pow2_at_least(W)
    q_parts = [jnp.pad(q, ((0, 0), (0, 0), (0, Mp - M), (0, 0))) for q in q_parts]
    pos_GM1 = jnp.pad(pos_GM1, ((0, 0), (0, Mp - M), (0, 0)), constant_values=-1)
    pages_GW = jnp.pad(pages_GW, ((0, 0), (0, Wp - W)))
    n_parts = len(q_parts)
    q_spec = pl.BlockSpec((None, None, Mp, last), lambda g, h: (g, h, 0, 0))
    cache_spec = pl.BlockSpec(k_cache.shape, lambda g, h: (0,) * 5)
    outs = pl.pallas_call(
        functools.partial(_gpu_kernel, layer=layer, n_parts=n_parts, Z=Z),
        grid=(G, K),
        in_specs=[
            pl.BlockSpec((None, Wp), lambda g, h: (g, 0)),
            pl.BlockSpec((1,), lambda g, h: (g,)),
            *[q_spec] * n_parts,
            pl.BlockSpec((None, Mp, 1), lambda g, h: (g, 0, 0)),
            cache_spec,
            cache_spec,
        ],
        out_specs=[q_spec] * n_parts,
        out_shape=[jax.ShapeDtypeStruct(q.shape, jnp.float32) for q in q_parts],
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),  # Triton, not Mosaic
        interpret=interpret,
        name="mlx_paged_attention",
    )(pages_GW, kv_len_G, *q_parts, pos_GM1, k_cache, v_cache)
    return [o[:, :, :M] for o in outs]


def paged_attention(
    q_GLHX: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: int,
    pages_GW: jax.Array,
    q_pos_GL: jax.Array,
    kv_len_G: jax.Array,
    *,
    flavour: str = "tpu",
    interpret: bool = False,
) -> jax.Array:
    """Dense causal attention of G groups of L queries over their pages of layer `layer` of the
    cache [N, P, Z, K, X']; `interpret` runs the kernel on CPU (tests)."""
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
    packed = is_packed(k_cache)
    G, L, H, X = q_GLHX.shape
    K = k_cache.shape[3]
    Q = H // K
    q = q_GLHX.astype(jnp.float32) * jnp.float32(X**-0.5)
    q = evens_odds(q) if packed else q
    q_GKMX = q.reshape(G, L, K, Q, X).transpose(0, 2, 1, 3, 4).reshape(G, K, L * Q, X)
    q_parts = [q_GKMX[..., : X // 2], q_GKMX[..., X // 2 :]] if packed else [q_GKMX]
    pos_GM1 = jnp.repeat(jnp.asarray(q_pos_GL, jnp.int32), Q, axis=1)[..., None]
    call = _call_tpu if flavour == "tpu" else _call_gpu
    outs = call(
        q_parts,
        pos_GM1,
        k_cache,
        v_cache,
        layer,
        jnp.asarray(pages_GW, jnp.int32),
        jnp.asarray(kv_len_G, jnp.int32),
        interpret,
    )
    o_GKMX = jnp.concatenate(outs, axis=-1) if packed else outs[0]
    o_GLHX = o_GKMX.reshape(G, K, L, Q, X).transpose(0, 2, 1, 3, 4).reshape(G, L, H, X)
    return (interleave(o_GLHX) if packed else o_GLHX).astype(q_GLHX.dtype)
