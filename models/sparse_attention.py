"""Sparse Transformer attention (Child et al. 2019): strided and fixed factorized patterns.

Query position i may see key position j (always 0 <= j <= i) when j is in

    strided  A1: i - j <= l                    A2: (i - j) mod l == 0
    fixed    A1: j // l == i // l              A2: j mod l >= l - c

with stride l and summary width c. Two sub-patterns combine in one of two
ways: "interleave" (query head h uses A1 if h is even, A2 if odd) or "union"
(every head sees A1 | A2).

Dense masks do not save work here (every block below the diagonal is
partially visible), so the training form gathers keys by reshapes instead,
sequence padded to R = ceil(L / l) blocks of l (block letters as in
models/gathered_attention.py):

    strided A1  each block with itself and its predecessor     O(L * 2l)
    strided A2  view [R, l], attend down each of the l columns  O(L * R)
    fixed A1    each block with itself (block diagonal)         O(L * l)
    fixed A2    every query over the c * R summary keys         O(L * c * R)

so with l ~ sqrt(L) work and memory grow like L * sqrt(L). In "union" mode
the two parts run over disjoint key sets (A2 minus A1) and their softmaxes
merge exactly by log-sum-exp; in "interleave" mode each half of the heads
runs one part only. A query that sees no key (a fixed-A2 head before the
first summary position) outputs zeros.

Positions. The rules read absolute positions. `mask` accepts any int
positions: a key at a negative position (padding) is never visible, and a
query at a negative position sees nothing (an all-False row; kernels must
not normalise it). Positions must stay below 2**31 / 2. `full_attention`
gathers keys by index and applies the rule to the gathered positions, so
it equals dense masked attention whenever each row's positions are
`offset + arange(L)` with offset a multiple of l (training uses offset 0);
other layouts only ever attend to a subset of what the mask allows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from models.attention_config import HEAD_MODES
from models.errors import ConfigError
from models.gathered_attention import block_attention, fill_invalid, merge_partial

# ---------------------------------------------------------------------------
# Reshape helpers: [B, L, ...] <-> R blocks of l
# ---------------------------------------------------------------------------


def _blocks(x, l: int, fill=0):
    """[B, L, ...] -> [B, R, l, ...], padded at the end with `fill`."""
    B, L = x.shape[:2]
    R = -(-L // l)
    pad = [(0, 0), (0, R * l - L)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, pad, constant_values=fill).reshape(B, R, l, *x.shape[2:])


def _unblock(x, L: int):
    """[B, R, l, ...] -> [B, L, ...], dropping the padding."""
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :L]


def _shift_blocks(x, fill):
    """Block r holds block r - 1; block 0 holds `fill`."""
    return jnp.concatenate([jnp.full_like(x[:, :1], fill), x[:, :-1]], axis=1)


def _pair_mask(rule, qp_BRM, kp_BRW):
    """[B, R, 1, M, W] mask of `rule` between each block's query and key positions."""
    return rule(qp_BRM[:, :, :, None], kp_BRW[:, :, None, :])[:, :, None]


def _head_subset(q_BLHX, k_BLKX, v_BLKX, parity: int):
    """Heads parity, parity + 2, ... with their kv heads, keeping GQA sharing where it can."""
    H, K = q_BLHX.shape[2], k_BLKX.shape[2]
    Q = H // K
    q_sub = q_BLHX[:, :, parity::2]
    if Q % 2 == 0:  # each kv head keeps Q / 2 query heads of this parity
        return q_sub, k_BLKX, v_BLKX
    kv = np.arange(parity, H, 2) // Q
    return q_sub, jnp.take(k_BLKX, kv, axis=2), jnp.take(v_BLKX, kv, axis=2)


def _interleave_heads(even_BLHX, odd_BLHX, H: int):
    """Put even-head and odd-head outputs back in head order."""
    if odd_BLHX.shape[2] < even_BLHX.shape[2]:
        odd_BLHX = jnp.pad(odd_BLHX, [(0, 0), (0, 0), (0, 1), (0, 0)])
    B, L, _, X = even_BLHX.shape
    return jnp.stack([even_BLHX, odd_BLHX], axis=3).reshape(B, L, -1, X)[:, :, :H]


# ---------------------------------------------------------------------------
# Patterns
# ---------------------------------------------------------------------------


def _causal(i, j):
    return (j >= 0) & (j <= i)


@dataclasses.dataclass(frozen=True)
class FactorizedPattern:
    """Shared machinery of the strided and fixed patterns (see the module docstring)."""

    stride: int
    n_heads: int
    heads: str = "interleave"

    name = "factorized"

    def __post_init__(self):
        if self.stride <= 0:
            raise ConfigError(f"{self.name} pattern: stride must be > 0, got {self.stride}")
        if self.heads not in HEAD_MODES:
            raise ConfigError(
                f"{self.name} pattern: heads='{self.heads}' is not one of {HEAD_MODES}"
            )
        if self.heads == "interleave" and self.n_heads < 2:
            raise ConfigError(f"{self.name} pattern: heads='interleave' needs n_heads >= 2")

    # -- the rule, on broadcastable int arrays (numpy or jax) ----------------

    def a1(self, i, j):
        raise NotImplementedError

    def a2(self, i, j):
        raise NotImplementedError

    def a2_rest(self, i, j):
        """A2 minus A1: the part of A2 a union adds."""
        raise NotImplementedError

    def mask(self, q_pos_BL, k_pos_BT):
        """bool [B, P, L, T]: P = 1 for "union", P = n_heads for "interleave"."""
        i, j = q_pos_BL[:, :, None], k_pos_BT[:, None, :]
        a1_BLT, a2_BLT = self.a1(i, j), self.a2(i, j)
        if self.heads == "union":
            return (a1_BLT | a2_BLT)[:, None]
        odd_P = jnp.asarray(np.arange(self.n_heads) % 2 == 1)[None, :, None, None]
        return jnp.where(odd_P, a2_BLT[:, None], a1_BLT[:, None])

    # -- training ------------------------------------------------------------

    def part_a1(self, q_BLHX, k_BLKX, v_BLKX, pos_BL, rule):
        raise NotImplementedError

    def part_a2(self, q_BLHX, k_BLKX, v_BLKX, pos_BL, rule):
        raise NotImplementedError

    def full_attention(self, q_BLHX, k_BLKX, v_BLKX, pos_BL) -> jax.Array:
        """Causal attention under the pattern, without any L x L array; differentiable."""
        H = q_BLHX.shape[2]
        if self.heads == "union":
            parts = [
                self.part_a1(q_BLHX, k_BLKX, v_BLKX, pos_BL, self.a1),
                self.part_a2(q_BLHX, k_BLKX, v_BLKX, pos_BL, self.a2_rest),
            ]
            return merge_partial(parts).astype(q_BLHX.dtype)
        if self.n_heads != H:
            raise ValueError(f"pattern built for {self.n_heads} heads got {H}")
        even, _ = self.part_a1(*_head_subset(q_BLHX, k_BLKX, v_BLKX, 0), pos_BL, self.a1)
        odd, _ = self.part_a2(*_head_subset(q_BLHX, k_BLKX, v_BLKX, 1), pos_BL, self.a2)
        return _interleave_heads(even, odd, H).astype(q_BLHX.dtype)

    # -- decoding ------------------------------------------------------------

    def needed_positions(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def needed_index(self, q_pos_B, max_len: int):
        raise NotImplementedError

    def num_needed(self, max_len: int) -> int:
        """U, the static width of `needed_index` for contexts of up to max_len positions."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Strided(FactorizedPattern):
    """A1: the previous l positions; A2: every l-th position before."""

    name = "strided"

    def a1(self, i, j):
        return _causal(i, j) & (i - j <= self.stride)

    def a2(self, i, j):
        return _causal(i, j) & ((i - j) % self.stride == 0)

    def a2_rest(self, i, j):
        return self.a2(i, j) & (i - j > self.stride)

    def part_a1(self, q_BLHX, k_BLKX, v_BLKX, pos_BL, rule):
        l, L = self.stride, q_BLHX.shape[1]
        k_BRlKX, v_BRlKX, kp_BRl = _blocks(k_BLKX, l), _blocks(v_BLKX, l), _blocks(pos_BL, l, -1)
        window = lambda x, fill: jnp.concatenate([_shift_blocks(x, fill), x], axis=2)
        o, lse = block_attention(
            _blocks(q_BLHX, l),
            window(k_BRlKX, 0),
            window(v_BRlKX, 0),
            _pair_mask(rule, kp_BRl, window(kp_BRl, -1)),
        )
        return _unblock(o, L), _unblock(lse, L)

    def part_a2(self, q_BLHX, k_BLKX, v_BLKX, pos_BL, rule):
        l, L = self.stride, q_BLHX.shape[1]
        cols = lambda x, fill=0: jnp.swapaxes(_blocks(x, l, fill), 1, 2)  # [B, l, R, ...]
        p_BlR = cols(pos_BL, -1)
        o, lse = block_attention(
            cols(q_BLHX), cols(k_BLKX), cols(v_BLKX), _pair_mask(rule, p_BlR, p_BlR)
        )
        return _unblock(jnp.swapaxes(o, 1, 2), L), _unblock(jnp.swapaxes(lse, 1, 2), L)

    def needed_positions(self, i: int) -> np.ndarray:
        l = self.stride
        if i < 0:
            return np.zeros(0, np.int64)
        return np.union1d(np.arange(max(0, i - l), i + 1), np.arange(i % l, i + 1, l))

    def _widths(self, max_len: int) -> tuple[int, int]:
        """(local window, far strided positions) slots of needed_index."""
        return min(self.stride + 1, max_len), max(0, (max_len - 1) // self.stride - 1)

    def num_needed(self, max_len: int) -> int:
        return sum(self._widths(max_len))

    def needed_index(self, q_pos_B, max_len: int):
        """(idx_BU int32, valid_BU bool), U = num_needed(max_len); see models/patterns.py."""
        w, far = self._widths(max_len)
        i_B1 = jnp.asarray(q_pos_B, jnp.int32)[:, None]
        far_BU = i_B1 - self.stride * (jnp.arange(far, dtype=jnp.int32)[::-1] + 2)
        local_BU = i_B1 - (w - 1) + jnp.arange(w, dtype=jnp.int32)
        idx_BU = jnp.concatenate([far_BU, local_BU], axis=1)
        return fill_invalid(idx_BU, (idx_BU >= 0) & (i_B1 >= 0), i_B1[:, 0])


@dataclasses.dataclass(frozen=True)
class Fixed(FactorizedPattern):
    """A1: the query's own block; A2: the last c positions of every block."""

    summary: int = 8

    name = "fixed"

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.summary <= self.stride:
            raise ConfigError(
                f"fixed pattern: summary={self.summary} must be in [1, stride={self.stride}]"
            )

    def a1(self, i, j):
        return _causal(i, j) & (i // self.stride == j // self.stride)

    def a2(self, i, j):
        return _causal(i, j) & (j % self.stride >= self.stride - self.summary)

    def a2_rest(self, i, j):
        return self.a2(i, j) & (j // self.stride < i // self.stride)

    def part_a1(self, q_BLHX, k_BLKX, v_BLKX, pos_BL, rule):
        l, L = self.stride, q_BLHX.shape[1]
        p_BRl = _blocks(pos_BL, l, -1)
        o, lse = block_attention(
            _blocks(q_BLHX, l),
            _blocks(k_BLKX, l),
            _blocks(v_BLKX, l),
            _pair_mask(rule, p_BRl, p_BRl),
        )
        return _unblock(o, L), _unblock(lse, L)

    def part_a2(self, q_BLHX, k_BLKX, v_BLKX, pos_BL, rule):
        l, c, B = self.stride, self.summary, q_BLHX.shape[0]
        # the last c positions of every block, as one block of R * c keys
        summ = lambda x, fill=0: _blocks(x, l, fill)[:, :, l - c :].reshape(B, 1, -1, *x.shape[2:])
        o, lse = block_attention(
            q_BLHX[:, None],
            summ(k_BLKX),
            summ(v_BLKX),
            _pair_mask(rule, pos_BL[:, None], summ(pos_BL, -1)),
        )
        return o[:, 0], lse[:, 0]

    def needed_positions(self, i: int) -> np.ndarray:
        l, c = self.stride, self.summary
        if i < 0:
            return np.zeros(0, np.int64)
        start = (i // l) * l
        summary = (np.arange(i // l)[:, None] * l + np.arange(l - c, l)).reshape(-1)
        return np.concatenate([summary, np.arange(start, i + 1)])

    def _widths(self, max_len: int) -> tuple[int, int]:
        """(own block, summary) slots of needed_index."""
        return min(self.stride, max_len), self.summary * ((max_len - 1) // self.stride)

    def num_needed(self, max_len: int) -> int:
        return sum(self._widths(max_len))

    def needed_index(self, q_pos_B, max_len: int):
        """(idx_BU int32, valid_BU bool), U = num_needed(max_len); see models/patterns.py."""
        l, c = self.stride, self.summary
        w, n_summary = self._widths(max_len)
        i_B1 = jnp.asarray(q_pos_B, jnp.int32)[:, None]
        block_B1 = i_B1 // l
        summ_U = (np.arange(n_summary // c)[:, None] * l + np.arange(l - c, l)).reshape(-1)
        summ_BU = jnp.broadcast_to(jnp.asarray(summ_U, jnp.int32), (i_B1.shape[0], n_summary))
        own_BU = block_B1 * l + jnp.arange(w, dtype=jnp.int32)
        idx_BU = jnp.concatenate([summ_BU, own_BU], axis=1)
        valid_BU = jnp.concatenate([summ_BU // l < block_B1, own_BU <= i_B1], axis=1)
        return fill_invalid(idx_BU, valid_BU & (idx_BU >= 0) & (i_B1 >= 0), i_B1[:, 0])


def make_pattern(name: str, stride: int, summary: int, heads: str, n_heads: int):
    """A sparse pattern by name ("strided" or "fixed")."""
    if name == "strided":
        return Strided(stride, n_heads, heads)
    if name == "fixed":
        return Fixed(stride, n_heads, heads, summary)
    raise ConfigError(f"unknown sparse pattern '{name}'; choose strided or fixed")
