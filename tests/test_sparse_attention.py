"""Sparse Transformer patterns: masks from the paper's sets, efficient == dense masked, decoding."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.gathered_attention import (
    block_attention,
    decode_attention,
    masked_attention,
    merge_partial,
    needed_pages,
    reference_attention,
)
from models.patterns import DenseCausal
from models.sparse_attention import Fixed, Strided

MODES = ("interleave", "union")


def make(kind: str, l: int, c: int, heads: str, n_heads: int):
    return Strided(l, n_heads, heads) if kind == "strided" else Fixed(l, n_heads, heads, c)


def paper_pair(kind: str, i: int, j: int, l: int, c: int) -> tuple[bool, bool]:
    """(j in A1_i, j in A2_i) exactly as the reference writes the sets, with 0 <= j <= i."""
    if not 0 <= j <= i:
        return False, False
    if kind == "strided":
        return j >= max(0, i - l), (i - j) % l == 0
    return j // l == i // l, j % l in range(l - c, l)


def paper_sets(kind: str, i: int, l: int, c: int) -> tuple[set, set]:
    pairs = {j: paper_pair(kind, i, j, l, c) for j in range(i + 1)}
    return {j for j, p in pairs.items() if p[0]}, {j for j, p in pairs.items() if p[1]}


def qkv(B, L, H, K, X=8, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(B, L, n, X)), dtype) for n in (H, K, K))  # q, k, v


def arange_pos(B, L, offset=0):
    return jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32) + offset, (B, L))


# ---------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["strided", "fixed"])
@pytest.mark.parametrize("l, c", [(4, 1), (4, 4), (5, 2), (1, 1)])
def test_mask_is_the_papers_sets_per_head(kind, l, c):
    n, H = 23, 3
    pos = arange_pos(1, n)
    inter = np.asarray(make(kind, l, c, "interleave", H).mask(pos, pos))
    union = np.asarray(make(kind, l, c, "union", H).mask(pos, pos))
    assert inter.shape == (1, H, n, n) and union.shape == (1, 1, n, n)
    for i in range(n):
        a1, a2 = paper_sets(kind, i, l, c)
        for h in range(H):
            assert set(np.flatnonzero(inter[0, h, i])) == (a1 if h % 2 == 0 else a2)
        assert set(np.flatnonzero(union[0, 0, i])) == a1 | a2


def test_mask_is_jittable_on_arbitrary_positions_and_hides_negative_ones():
    p = Fixed(4, 4, "interleave", 2)
    rng = np.random.default_rng(1)
    q_pos = jnp.asarray(rng.integers(-3, 10**6, (2, 5)), jnp.int32)
    k_pos = jnp.asarray(rng.integers(-3, 10**6, (2, 9)), jnp.int32)
    got = np.asarray(jax.jit(p.mask)(q_pos, k_pos))
    assert got.shape == (2, 4, 5, 9)
    q_np, k_np = np.asarray(q_pos).tolist(), np.asarray(k_pos).tolist()
    for b in range(2):
        for a, i in enumerate(q_np[b]):
            for t, j in enumerate(k_np[b]):
                in_a1, in_a2 = paper_pair("fixed", i, j, 4, 2)
                for h in range(4):
                    assert got[b, h, a, t] == (in_a1 if h % 2 == 0 else in_a2)
    neg = jnp.asarray([[-1, -5]], jnp.int32)
    assert not np.asarray(p.mask(neg, arange_pos(1, 6))).any()  # negative queries see nothing
    assert not np.asarray(p.mask(arange_pos(1, 6), neg)).any()  # negative keys are never seen


# ---------------------------------------------------------------------------
# Efficient training form == dense masked reference (outputs and gradients)
# ---------------------------------------------------------------------------

SHAPES = [(13, 4, 2), (33, 5, 5), (16, 4, 1), (30, 8, 3), (7, 8, 8)]  # (n, l, c)
HEADS = [(4, 2), (6, 2), (3, 3)]  # GQA with even and odd q-per-kv, and plain multi-head


@pytest.mark.parametrize("kind", ["strided", "fixed"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "case", [0, 1, *(pytest.param(i, marks=pytest.mark.slow) for i in range(2, len(SHAPES)))]
)
def test_full_attention_and_grads_equal_dense_masked(kind, mode, case):
    n, l, c = SHAPES[case]
    H, K = HEADS[(case + MODES.index(mode)) % len(HEADS)]
    p = make(kind, l, c, mode, H)
    q, k, v = qkv(2, n, H, K, seed=case)
    pos = arange_pos(2, n)
    cot = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), jnp.float32)

    @jax.jit
    def both(q, k, v):
        fast = lambda q, k, v: p.full_attention(q, k, v, pos)
        slow = lambda q, k, v: reference_attention(p, q, k, v, pos)
        grads = lambda fn: jax.grad(lambda *a: jnp.sum(fn(*a) * cot), argnums=(0, 1, 2))(q, k, v)
        return (fast(q, k, v), *grads(fast)), (slow(q, k, v), *grads(slow))

    fast, slow = both(q, k, v)
    np.testing.assert_allclose(fast[0], slow[0], atol=2e-6)  # outputs
    for a, b in zip(fast[1:], slow[1:], strict=True):  # d/dq, d/dk, d/dv
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("kind", ["strided", "fixed"])
def test_positions_offset_by_whole_blocks_still_match(kind):
    p = make(kind, 4, 2, "union", 4)
    q, k, v = qkv(1, 14, 4, 2)
    pos = arange_pos(1, 14, offset=8)
    fast, slow = jax.jit(lambda *a: (p.full_attention(*a), reference_attention(p, *a)))(
        q, k, v, pos
    )
    np.testing.assert_allclose(fast, slow, atol=2e-6)


def test_bfloat16_inputs_stay_close_to_float32():
    p = make("strided", 4, 1, "interleave", 4)
    q, k, v = qkv(1, 18, 4, 2)
    pos = arange_pos(1, 18)
    fn = jax.jit(p.full_attention)
    ref = fn(q, k, v, pos)
    bf = fn(*(x.astype(jnp.bfloat16) for x in (q, k, v)), pos)
    assert bf.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(bf, np.float32), ref, atol=0.05)


def _largest_array(fn, *args) -> int:
    text = jax.jit(fn).lower(*args).compile().as_text()
    shapes = re.findall(r"(?:f32|bf16|s32|pred)\[([\d,]+)\]", text)
    return max(int(np.prod([int(d) for d in s.split(",")])) for s in shapes)


@pytest.mark.parametrize("kind", ["strided", "fixed"])
def test_training_form_never_builds_a_length_squared_array(kind):
    n, l = 512, 16
    p = make(kind, l, 2, "union", 1)
    q, k, v = qkv(1, n, 1, 1)
    pos = arange_pos(1, n)
    grad = jax.grad(lambda q, k, v: jnp.sum(p.full_attention(q, k, v, pos)), argnums=(0, 1, 2))
    assert _largest_array(grad, q, k, v) <= 4 * n * l  # O(n * l) with l ~ sqrt(n); n * n = 32 n * l
    dense = jax.grad(lambda q, k, v: jnp.sum(reference_attention(p, q, k, v, pos)), (0, 1, 2))
    assert _largest_array(dense, q, k, v) >= n * n


def test_merging_disjoint_key_sets_equals_one_softmax():
    q, k, v = qkv(1, 6, 2, 1, seed=4)
    first = jnp.asarray(np.arange(6) < 2)[None, None, None, :]
    part = lambda m: block_attention(q[:, None], k[:, None], v[:, None], m[:, None])
    merged = merge_partial([part(first), part(~first)])[:, 0]
    np.testing.assert_allclose(
        merged, masked_attention(q, k, v, jnp.ones((1, 1, 6, 6), bool)), atol=1e-6
    )


def test_block_attention_zero_for_queries_that_see_nothing_and_rejects_bad_mask():
    q, k, v = qkv(1, 3, 2, 1)
    mask = jnp.asarray([[True, False, False], [False, False, False], [True, True, True]])
    out = masked_attention(q, k, v, mask[None, None])
    assert np.all(np.asarray(out[0, 1]) == 0) and np.abs(np.asarray(out[0, 0])).sum() > 0
    with pytest.raises(ValueError, match="expected 1 or 2"):
        block_attention(q[:, None], k[:, None], v[:, None], jnp.ones((1, 1, 3, 3, 3), bool))


# ---------------------------------------------------------------------------
# Decoding: needed positions, gathers, and the decode step
# ---------------------------------------------------------------------------

PATTERNS = [
    make("strided", 4, 1, "interleave", 4),
    make("strided", 5, 1, "union", 4),
    make("fixed", 4, 2, "interleave", 4),
    make("fixed", 5, 5, "union", 4),
    DenseCausal(),
]


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_needed_positions_and_index_agree_with_the_mask(pattern):
    T = 23
    pos = arange_pos(1, T)
    visible_T = np.asarray(pattern.mask(pos, pos)).any(axis=1)[0]  # under any head
    q_pos = jnp.asarray(list(range(-2, T)), jnp.int32)
    idx, valid = jax.jit(pattern.needed_index, static_argnums=1)(q_pos, T)
    assert idx.shape == valid.shape == (T + 2, pattern.num_needed(T)) and idx.dtype == jnp.int32
    for row, i in enumerate(np.asarray(q_pos)):
        want = np.flatnonzero(visible_T[i]) if i >= 0 else np.zeros(0, int)
        np.testing.assert_array_equal(pattern.needed_positions(int(i)), want)
        got = np.asarray(idx[row])[np.asarray(valid[row])]
        np.testing.assert_array_equal(got, want)  # ascending, no duplicates
        assert set(np.asarray(idx[row])[~np.asarray(valid[row])]) <= {max(i, 0)}


@pytest.mark.parametrize("kind", ["strided", "fixed"])
def test_needed_index_width_grows_like_sqrt_of_context(kind):
    p = make(kind, 128, 8, "union", 2)
    # l + 1 local + (n / l - 2) strided, or l own block + c * (n / l - 1) summaries: vs 16384
    assert p.num_needed(16384) == {"strided": 129 + 126, "fixed": 128 + 8 * 127}[kind]
    assert p.num_needed(100) == 100  # never wider than the context
    i = jnp.asarray([16383], jnp.int32)
    idx, valid = p.needed_index(i, 16384)
    assert int(valid.sum()) == len(p.needed_positions(16383))


def _poisoned_cache(pattern, k, v, pos_B):
    """Cache copies in which every entry a row's query does not need is NaN."""
    keep = np.zeros(k.shape[:2], bool)
    for b, i in enumerate(pos_B):
        keep[b, pattern.needed_positions(int(i))] = True
    return [np.where(keep[:, :, None, None], c, np.nan).astype(np.float32) for c in (k, v)]


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_decode_step_equals_rows_of_full_attention_reading_only_needed_positions(pattern):
    B, T, H, K = 2, 21, 4, 2
    q, k, v = qkv(B, T, H, K, seed=3)
    full = np.asarray(jax.jit(pattern.full_attention)(q, k, v, arange_pos(B, T)))
    q, k, v = (np.asarray(x) for x in (q, k, v))
    step = jax.jit(decode_attention, static_argnums=4)
    for i in range(T):
        pos_B = np.array([i, T - 1 - i], np.int32)  # a different position per row
        k_c, v_c = _poisoned_cache(pattern, k, v, pos_B)
        out = np.asarray(step(q[np.arange(B), pos_B], k_c, v_c, pos_B, pattern))
        np.testing.assert_allclose(out, full[np.arange(B), pos_B], atol=2e-6)


@pytest.mark.parametrize("pattern", PATTERNS[:4], ids=repr)
def test_needed_pages_cover_exactly_the_pages_of_needed_positions(pattern):
    T, Z = 40, 3
    q_pos = jnp.asarray([-1, 0, 7, 22, 39], jnp.int32)
    pages, valid = jax.jit(needed_pages, static_argnums=(0, 2, 3))(pattern, q_pos, T, Z)
    assert pages.shape == (5, min(-(-T // Z), pattern.num_needed(T)))
    for row, i in enumerate(np.asarray(q_pos)):
        want = sorted({int(j) // Z for j in pattern.needed_positions(int(i))})
        np.testing.assert_array_equal(np.asarray(pages[row])[np.asarray(valid[row])], want)


@pytest.mark.parametrize("pattern", PATTERNS[:4], ids=repr)
def test_paged_gather_of_needed_pages_equals_decode_step(pattern):
    """How the engine uses the interface: gather needed pages only, mask their positions."""
    B, T, Z, H, K = 2, 24, 4, 4, 2
    q, k, v = qkv(B, T, H, K, seed=5)
    pos_B = jnp.asarray([22, 9], jnp.int32)
    q_BHX = q[jnp.arange(B), pos_B]
    ref = jax.jit(decode_attention, static_argnums=4)(q_BHX, k, v, pos_B, pattern)
    pages_BP, valid_BP = needed_pages(pattern, pos_B, T, Z)
    keep = np.zeros((B, T // Z), bool)
    for b in range(B):
        keep[b, np.asarray(pages_BP[b])[np.asarray(valid_BP[b])]] = True
    poison = lambda c: np.where(
        keep[:, :, None, None, None], c.reshape(B, T // Z, Z, K, -1), np.nan
    )

    @jax.jit
    def paged_step(q_BHX, k_pages, v_pages, pages_BP, valid_BP):
        take = lambda c: jnp.take_along_axis(c, pages_BP[:, :, None, None, None], 1).reshape(
            B, 1, -1, K, c.shape[-1]
        )
        k_pos_BW = (pages_BP[:, :, None] * Z + jnp.arange(Z)).reshape(B, -1)
        valid_BW = jnp.repeat(valid_BP, Z, axis=1)
        mask = pattern.mask(pos_B[:, None], k_pos_BW) & valid_BW[:, None, None]
        out, _ = block_attention(q_BHX[:, None, None], take(k_pages), take(v_pages), mask[:, None])
        return out[:, 0, 0]

    out = paged_step(q_BHX, poison(np.asarray(k)), poison(np.asarray(v)), pages_BP, valid_BP)
    np.testing.assert_allclose(out, ref, atol=2e-6)
