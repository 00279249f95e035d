"""Attention patterns: which keys each query may see.

A pattern answers three questions, one per consumer:

- `mask(q_pos_BL, k_pos_BT) -> bool [B, P, L, T]` (P = 1, or one row per
  query head for per-head patterns): the exact rule, used by the paged
  serving kernel and by the dense masked reference in tests;
- `full_attention(q_BLHX, k_BLKX, v_BLKX, pos_BL)`: the efficient
  whole-sequence form used in training;
- `needed_positions(i) -> int array`: host-side, the key positions query
  position i needs, so the engine can gather only the KV pages they live in.

Dense causal attention is the default pattern; the Sparse Transformer's
strided and fixed patterns live beside it.
"""

from __future__ import annotations

import numpy as np

from models.attention_core import causal_attention


class DenseCausal:
    name = "dense"

    def mask(self, q_pos_BL, k_pos_BT):
        return (k_pos_BT[:, None, :] <= q_pos_BL[:, :, None])[:, None]

    def full_attention(self, q_BLHX, k_BLKX, v_BLKX, pos_BL):
        return causal_attention(q_BLHX, k_BLKX, v_BLKX, pos_BL, pos_BL)

    def needed_positions(self, i: int) -> np.ndarray:
        return np.arange(i + 1)

    def __repr__(self) -> str:
        return "DenseCausal()"


def pattern_for_layer(cfg, layer: int):
    """The attention pattern of one layer under a model config."""
    del cfg, layer
    return DenseCausal()
