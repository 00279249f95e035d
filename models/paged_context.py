"""The serving engine's attention context over a paged KV cache (`models/paged_attention.py`).

A step's tokens are flat (`x_TD`); the context knows, per token, where its K
and V go (`write_page_T`, `write_offset_T`), and which *groups* of queries
read which pages:

- the decode group: G = D slots of `dec_width` (L) consecutive queries each, the
  first D * L tokens (L = 1: one query per slot; L > 1: a sequence verifying
  draft tokens, each query seeing the context up to its own position, or with
  `dec_tree_DLL` a token tree, each node seeing the context and its ancestors);
- the prefill group: R rows of up to C consecutive tokens of one sequence,
  gathered from the remaining tokens by `pre_index_RC`.

Each group reads the pages of its page table up to its context length, masked
by the layer's attention pattern, on the kernel `KernelOptions` picks: the
native CPU kernels (`models/native_kernels.py`) for dense groups on one CPU
device, a Pallas kernel on TPU/GPU, else the pure-JAX kernels.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from models.paged_attention import gathered_decode_attention, is_packed, pack, paged_attention
from models.patterns import DenseCausal


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
    # token trees (SpecInfer): node l of slot d is written at dec_base[d] + l and sees the
    # context and the nodes dec_tree[d, i, :] marks (itself and its ancestors)
    dec_tree_DLL: jax.Array | None = None
    dec_base_D: jax.Array | None = None
    # the tokens' adapter slots (models/lora_pool.py): [T] per token, or by segment
    lora_slots: object = None

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
        trees = D and L > 1 and self.dec_tree_DLL is not None  # token trees: pure JAX, masked
        if D and pallas and not trees:
            H, X = q_THX.shape[1:]
            o = pallas(
                q_THX[: D * L].reshape(D, L, H, X),
                pages_GW=self.dec_pages_DW,
                q_pos_GL=self.positions_T[: D * L].reshape(D, L),
                kv_len_G=self.dec_len_D,
            )
            outs.append(o.reshape(D * L, H, X))
        elif D and L > 1 and not trees and self.kernel.native and isinstance(pattern, DenseCausal):
            outs.append(self._native_multi(layer, q_THX[: D * L]))
        elif D and L > 1:  # several queries per slot: causal by position, or a tree's mask
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
                tree_GLL=self.dec_tree_DLL if trees else None,
                tree_base_G=self.dec_base_D if trees else None,
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
