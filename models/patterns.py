"""Attention patterns: which keys each query may see.

A pattern answers four questions, one per consumer:

- `mask(q_pos_BL, k_pos_BT) -> bool [B, P, L, T]` (P = 1, or one row per
  query head for per-head patterns): the exact rule on absolute positions,
  jittable on any int arrays; used by the paged serving kernel and by the
  dense masked reference in tests. Sparse patterns never show a key at a
  negative (padding) position, and a query at a negative position sees nothing;
- `full_attention(q_BLHX, k_BLKX, v_BLKX, pos_BL)`: the efficient
  whole-sequence form used in training (differentiable);
- `needed_positions(i) -> int array`: host-side, the sorted key positions
  query position i needs (under any head), so the engine can gather only the
  KV pages they live in;
- `needed_index(q_pos_B, max_len) -> (idx_BU int32, valid_BU bool)`: the same
  set in a jittable fixed shape, U = `num_needed(max_len)` a static bound for
  contexts of up to max_len positions (queries at positions < max_len).
  Valid entries are ascending; invalid ones repeat the query's own position
  (so they are in range), and must be masked out with `valid`.
  `models.gathered_attention.needed_pages` turns it into KV pages and
  `decode_attention` is the reference decode step over a contiguous cache.

Dense causal attention is the default pattern; the Sparse Transformer's
strided and fixed patterns are in models/sparse_attention.py.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from models.attention_core import causal_attention
from models.errors import ConfigError


class DenseCausal:
    name = "dense"

    def mask(self, q_pos_BL, k_pos_BT):
        return (k_pos_BT[:, None, :] <= q_pos_BL[:, :, None])[:, None]

    def full_attention(self, q_BLHX, k_BLKX, v_BLKX, pos_BL):
        return causal_attention(q_BLHX, k_BLKX, v_BLKX, pos_BL, pos_BL)

    def needed_positions(self, i: int) -> np.ndarray:
        return np.arange(i + 1)

    def num_needed(self, max_len: int) -> int:
        return max_len

    def needed_index(self, q_pos_B, max_len: int):
        i_B1 = jnp.asarray(q_pos_B, jnp.int32)[:, None]
        idx_BU = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (i_B1.shape[0], max_len))
        valid_BU = idx_BU <= i_B1
        return jnp.where(valid_BU, idx_BU, jnp.maximum(i_B1, 0)), valid_BU

    def __eq__(self, other) -> bool:
        return type(other) is DenseCausal

    def __hash__(self) -> int:
        return hash(DenseCausal)

    def __repr__(self) -> str:
        return "DenseCausal()"


def pattern_for_layer(cfg, layer: int):
    """The attention pattern of one layer under a model config (`cfg.attention`)."""
    if not 0 <= layer < cfg.n_layers:
        raise ConfigError(f"layer {layer} is out of range for a {cfg.n_layers}-layer model")
    a = cfg.attention
    name = a.pattern_name(layer)
    if name == "dense":
        return DenseCausal()
    from models.sparse_attention import make_pattern

    return make_pattern(name, a.stride, a.summary, a.heads, cfg.n_heads)
