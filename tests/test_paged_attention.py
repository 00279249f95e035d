"""Paged attention equals dense attention; the paged model forward equals the full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import Transformer
from models.attention_core import causal_attention
from models.paged_attention import paged_attention
from models.paged_context import KernelOptions, PagedContext
from models.patterns import DenseCausal


def _dense_rows(q_GLHX, k_GTKX, v_GTKX, q_pos_GL, kv_len_G):
    """Reference: causal attention over each group's contiguous context."""
    out = []
    for g in range(q_GLHX.shape[0]):
        n = int(kv_len_G[g])
        k, v = k_GTKX[g : g + 1, :n], v_GTKX[g : g + 1, :n]
        o = causal_attention(q_GLHX[g : g + 1], k, v, q_pos_GL[g : g + 1], jnp.arange(n)[None])
        out.append(o[0])
    return np.stack(out)


@pytest.mark.parametrize("chunk_pages", [1, 2, 8])
def test_paged_attention_equals_dense(chunk_pages):
    rng = np.random.default_rng(0)
    G, L, H, K, X, Z, P, W = 4, 6, 4, 2, 8, 4, 64, 7
    kv_len = np.array([25, 6, 13, 28], np.int32)
    q_pos = (kv_len[:, None] - L + np.arange(L)).astype(np.int32)
    k_ctx = rng.normal(size=(G, W * Z, K, X)).astype(np.float32)
    v_ctx = rng.normal(size=(G, W * Z, K, X)).astype(np.float32)
    # scatter each group's contiguous context into random pages of a shared pool
    pages = rng.permutation(np.arange(1, P))[: G * W].reshape(G, W).astype(np.int32)
    k_cache = np.zeros((P, Z, K, X), np.float32)
    v_cache = np.zeros((P, Z, K, X), np.float32)
    for g in range(G):
        k_cache[pages[g]] = k_ctx[g].reshape(W, Z, K, X)
        v_cache[pages[g]] = v_ctx[g].reshape(W, Z, K, X)
    q = rng.normal(size=(G, L, H, X)).astype(np.float32)
    fn = jax.jit(paged_attention, static_argnums=(6, 7))
    out = fn(q, k_cache, v_cache, pages, q_pos, kv_len, DenseCausal(), chunk_pages)
    ref = _dense_rows(q, k_ctx, v_ctx, q_pos, kv_len)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_padding_queries_return_zeros():
    P, Z, K, X = 4, 2, 1, 4
    cache = np.ones((P, Z, K, X), np.float32)
    q = np.ones((2, 1, 2, X), np.float32)
    out = paged_attention(
        q,
        cache,
        cache,
        np.zeros((2, 3), np.int32),
        np.zeros((2, 1), np.int32),
        np.array([0, 0], np.int32),
        DenseCausal(),
    )
    assert np.all(np.asarray(out) == 0)


def test_paged_forward_equals_full_forward(tiny_cfg):
    """Prefill a prompt in two chunks plus a decode token through PagedContext: logits equal
    the full-sequence forward at every position."""
    model = Transformer(tiny_cfg, nnx.Rngs(0))
    cfg = tiny_cfg
    Z, P, W = 4, 32, 8
    tokens = np.random.default_rng(1).integers(0, 256, 19).astype(np.int32)
    full = np.asarray(model(jnp.asarray(tokens)[None]))[0]
    kshape = (cfg.n_layers, P, Z, cfg.n_kv_heads, cfg.head_dim)
    k, v = jnp.zeros(kshape), jnp.zeros(kshape)
    pages = np.arange(3, 3 + W, dtype=np.int32)  # any pages
    got = []
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, toks, *ctx_args):  # one compiled forward per call shape
        m = nnx.merge(graphdef, state)
        ctx = PagedContext(*ctx_args, kernel=KernelOptions(2))
        x, _ = m.forward(m.embed_tokens(toks), ctx)
        return m.logits(x), ctx.k, ctx.v

    for lo, hi in [(0, 11), (11, 18)]:  # two prefill chunks (one row each)
        n = hi - lo
        pos = np.arange(lo, hi, dtype=np.int32)
        logits, k, v = run(
            state,
            jnp.asarray(tokens[lo:hi]),
            k,
            v,
            jnp.asarray(pos),
            jnp.asarray(pages[pos // Z]),
            jnp.asarray(pos % Z),
            jnp.zeros((0, W), jnp.int32),
            jnp.zeros((0,), jnp.int32),
            jnp.arange(n, dtype=jnp.int32)[None],
            jnp.asarray(pages[None]),
            jnp.array([hi]),
        )
        got.append(np.asarray(logits))
    pos = np.array([18], np.int32)  # one decode token
    logits, k, v = run(
        state,
        jnp.asarray(tokens[18:19]),
        k,
        v,
        jnp.asarray(pos),
        jnp.asarray(pages[pos // Z]),
        jnp.asarray(pos % Z),
        jnp.asarray(pages[None]),
        jnp.array([19]),
    )
    got.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(got), full, atol=2e-5)


def test_bf16_pack_round_trip_and_permutation():
    from models.paged_attention import evens_odds, interleave, pack, unpack

    x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 2, 8)), jnp.bfloat16)
    w = pack(x)
    assert w.dtype == jnp.uint32 and w.shape == (3, 2, 4)
    np.testing.assert_array_equal(
        np.asarray(unpack(w)), np.asarray(evens_odds(x.astype(jnp.float32)))
    )
    np.testing.assert_array_equal(np.asarray(interleave(evens_odds(x))), np.asarray(x))


def test_packed_bf16_cache_attention_matches_float32():
    from models.paged_attention import pack

    rng = np.random.default_rng(3)
    G, L, H, K, X, Z, P, W = 3, 4, 4, 2, 8, 4, 32, 5
    kv_len = np.array([17, 4, 20], np.int32)
    q_pos = (kv_len[:, None] - L + np.arange(L)).astype(np.int32)
    k = jnp.asarray(rng.normal(size=(P, Z, K, X)), jnp.bfloat16)
    v = jnp.asarray(rng.normal(size=(P, Z, K, X)), jnp.bfloat16)
    pages = rng.permutation(np.arange(1, P))[: G * W].reshape(G, W).astype(np.int32)
    q = jnp.asarray(rng.normal(size=(G, L, H, X)), jnp.bfloat16)
    fn = jax.jit(paged_attention, static_argnums=(6, 7))
    ref = fn(
        q.astype(jnp.float32),
        k.astype(jnp.float32),
        v.astype(jnp.float32),
        pages,
        q_pos,
        kv_len,
        DenseCausal(),
        2,
    )
    got = fn(q, pack(k), pack(v), pages, q_pos, kv_len, DenseCausal(), 2)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref), atol=2e-2)


@pytest.mark.parametrize("packed", [False, True])
def test_gathered_sparse_decode_equals_masked_paged_attention(packed):
    from models.paged_attention import gathered_decode_attention, pack
    from models.sparse_attention import make_pattern

    rng = np.random.default_rng(4)
    G, H, K, X, Z, P, W = 3, 4, 2, 8, 4, 40, 9
    pattern = make_pattern("fixed", 8, 2, "interleave", H)
    kv_len = np.array([33, 9, 20], np.int32)
    pages = rng.permutation(np.arange(1, P))[: G * W].reshape(G, W).astype(np.int32)
    dt = jnp.bfloat16 if packed else jnp.float32
    k = jnp.asarray(rng.normal(size=(1, P, Z, K, X)), dt)
    v = jnp.asarray(rng.normal(size=(1, P, Z, K, X)), dt)
    q = jnp.asarray(rng.normal(size=(G, H, X)), dt)
    kc, vc = (pack(k), pack(v)) if packed else (k, v)
    got = jax.jit(gathered_decode_attention, static_argnums=(3, 7))(
        q, kc, vc, 0, pages, kv_len - 1, kv_len, pattern
    )
    ref = jax.jit(paged_attention, static_argnums=(6, 7, 8))(
        q[:, None], kc, vc, pages, (kv_len - 1)[:, None], kv_len, pattern, 2, 0
    )[:, 0]
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(ref, np.float32), atol=1e-2 if packed else 1e-5
    )


@pytest.mark.parametrize("packed", [False, True])
def test_native_decode_kernel_equals_pure_jax(packed):
    from models import native_kernels
    from models.paged_attention import pack

    if not native_kernels.available():
        pytest.skip("no C++ compiler: the engine uses the pure-JAX kernel")
    rng = np.random.default_rng(6)
    G, H, K, X, Z, P, W, N = 5, 4, 2, 8, 4, 50, 9, 3
    kv_len = np.array([33, 0, 1, 36, 17], np.int32)  # includes a padding slot
    pages = rng.permutation(np.arange(1, P))[: G * W].reshape(G, W).astype(np.int32)
    dt = jnp.bfloat16 if packed else jnp.float32
    k = jnp.asarray(rng.normal(size=(N, P, Z, K, X)), dt)
    v = jnp.asarray(rng.normal(size=(N, P, Z, K, X)), dt)
    kc, vc = (pack(k), pack(v)) if packed else (k, v)
    q = jnp.asarray(rng.normal(size=(G, H, X)), dt)
    got = jax.jit(native_kernels.paged_decode, static_argnums=(5,))(q, kc, vc, pages, kv_len, 2)
    ref = jax.jit(paged_attention, static_argnums=(6, 7, 8))(
        q[:, None], kc, vc, pages, (kv_len - 1)[:, None], kv_len, DenseCausal(), 2, 2
    )[:, 0]
    tol = 1e-2 if packed else 1e-5
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref, np.float32), atol=tol)
    assert np.all(np.asarray(got)[1] == 0)  # a padding slot reads nothing


@pytest.mark.parametrize("chunk_pages", [1, 8])
def test_tree_mask_sees_the_context_and_the_ancestors_only(chunk_pages):
    """Token-tree verification: node i (key at base + i, query at its depth past the context)
    attends to the keys before the tree and to its ancestors and itself, nothing else."""
    rng = np.random.default_rng(3)
    K, H, X, Z, P, W = 2, 4, 8, 4, 32, 6
    parent = np.array([-1, 0, 0, 1, 1, 3, -1])  # node 6: padding
    L = len(parent)
    depth = np.zeros(L, int)
    for c in range(1, L):
        depth[c] = depth[parent[c]] + 1 if parent[c] >= 0 else 0
    G, base = 2, np.array([9, 14])
    kv_len = base + L - 1  # the padding node's key is past the length
    pages = rng.permutation(np.arange(1, P))[: G * W].reshape(G, W).astype(np.int32)
    k_cache = rng.normal(size=(P, Z, K, X)).astype(np.float32)
    v_cache = rng.normal(size=(P, Z, K, X)).astype(np.float32)
    q = rng.normal(size=(G, L, H, X)).astype(np.float32)
    anc = np.zeros((L, L), bool)
    for i in range(L):
        j = i
        while j >= 0:
            anc[i, j] = True
            j = parent[j]
    tree = np.broadcast_to(anc, (G, L, L))
    q_pos = base[:, None] + depth[None, :]
    got = paged_attention(jnp.asarray(q), k_cache, v_cache, pages, q_pos, kv_len, DenseCausal(),
                          chunk_pages, tree_GLL=jnp.asarray(tree), tree_base_G=base)  # fmt: skip
    flat_k = k_cache[pages].reshape(G, W * Z, K, X)
    flat_v = v_cache[pages].reshape(G, W * Z, K, X)
    for g in range(G):
        for i in range(L - 1):  # the padding node's output is discarded
            keys = list(range(base[g])) + [base[g] + j for j in range(L) if anc[i, j]]
            keys = [t for t in keys if t < kv_len[g]]
            for h in range(H):
                kk, vv = flat_k[g, keys, h // (H // K)], flat_v[g, keys, h // (H // K)]
                s = kk @ q[g, i, h] / np.sqrt(X)
                w = np.exp(s - s.max())
                want = (w / w.sum()) @ vv
                np.testing.assert_allclose(np.asarray(got[g, i, h]), want, rtol=2e-5, atol=2e-5)
