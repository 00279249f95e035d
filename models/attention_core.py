"""Dense causal attention kernel shared by patterns and contexts.

The attention has its own gradient (`_attention`, a custom VJP): the forward
keeps the unnormalised probabilities P and their row sums l, and the backward
uses them directly (dS = P * (dP - rowsum(dO * O)) / l), with every large
operand of its matmuls in the layout XLA:CPU's fast dot path takes (the score
matrices are never transposed; only [.., X]-sized operands are). The default
gradient of the softmax instead re-read the score matrices in transposed form
and, for bfloat16, ran its matmuls in float32. With `ordered=True` the queries
go in blocks that skip the (fully masked) key blocks after them.

Letters beyond the package key (models/__init__.py): M = Q * L folded query
rows of one kv head; U = query rows of one block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint

NEG_INF = -1e30
# Query rows per block when key blocks after the diagonal are skipped: the
# fastest of 32/64/128/256 for the fwd+bwd at L=256 on the CPU (blocks of 64
# do 5/8 of the full work; smaller blocks pay more per-op overhead).
QUERY_BLOCK = 64


def can_fix_layouts() -> bool:
    """Whether `row_major` pins layouts here: not under a mesh of several devices, where
    the layout constraint is not partitioned and GSPMD would gather its operand onto
    every device."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1


def row_major(x: jax.Array) -> jax.Array:
    """`x` materialised in row-major order: a transposed operand stays transposed.

    XLA otherwise folds a transpose into the consuming dot's dimension numbers,
    and XLA:CPU runs a bfloat16 dot whose left operand contracts its major
    dimension in float32, on the slow path. `x` unchanged where
    `can_fix_layouts()` is False: callers must then not depend on it (a transpose
    of a bf16 dot's result that XLA folds into the dot after choosing bf16 makes a
    dot XLA:CPU cannot run at all).
    """
    x = jnp.asarray(x)  # eager calls may pass numpy arrays
    if not can_fix_layouts():
        return x
    return with_layout_constraint(x, Layout(tuple(range(x.ndim))))


def causal_attention(
    q_BLHX: jax.Array,
    k_BTKX: jax.Array,
    v_BTKX: jax.Array,
    q_pos_BL: jax.Array,
    k_pos_BT: jax.Array,
    ordered: bool = False,
) -> jax.Array:
    """Dense attention where query i sees keys with position <= its own; f32 softmax.

    Query heads of one kv head are folded into the query length so each
    (batch, kv head) pair is one plain matmul (faster on CPU than a 5-D einsum).
    `ordered=True` promises q_pos == k_pos, strictly increasing along each row
    (whole sequences from position 0 up): query blocks then skip the key blocks
    after them, which the mask would hide anyway.
    """
    B, L, H, X = q_BLHX.shape
    T, K = k_BTKX.shape[1], k_BTKX.shape[2]
    # materialised transposes: as layout changes, XLA:CPU would run bf16 dots on them in f32
    q_BKQLX = row_major(q_BLHX.reshape(B, L, K, H // K, X).transpose(0, 2, 3, 1, 4))
    k_BKTX = row_major(k_BTKX.transpose(0, 2, 1, 3))
    v_BKTX = row_major(v_BTKX.transpose(0, 2, 1, 3))
    mask_BLT = k_pos_BT[:, None, :] <= q_pos_BL[:, :, None]
    blocks = L // QUERY_BLOCK if ordered and T == L and L % QUERY_BLOCK == 0 else 1
    o_BKQLX = _attention(q_BKQLX, k_BKTX, v_BKTX, mask_BLT, blocks)
    return o_BKQLX.transpose(0, 3, 1, 2, 4).reshape(B, L, H, X)


def _block_rows(q_BKQLX, blocks: int, i: int):
    """Query block i folded to [B, K, M, X] rows, and its static key count."""
    B, K, Q, L, X = q_BKQLX.shape
    U = L // blocks
    T_i = (i + 1) * U if blocks > 1 else None  # keys past the block's last query are masked
    return q_BKQLX[:, :, :, i * U : (i + 1) * U].reshape(B, K, Q * U, X), U, T_i


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q_BKQLX, k_BKTX, v_BKTX, mask_BLT, blocks):
    """Softmax attention of folded query rows, block by block over the queries."""
    return _attention_fwd(q_BKQLX, k_BKTX, v_BKTX, mask_BLT, blocks)[0]


def _attention_fwd(q_BKQLX, k_BKTX, v_BKTX, mask_BLT, blocks):
    B, K, Q, L, X = q_BKQLX.shape
    f32 = jnp.float32
    outs, saved = [], []
    for i in range(blocks):
        q_BKMX, U, T_i = _block_rows(q_BKQLX, blocks, i)
        k, v = k_BKTX[:, :, :T_i], v_BKTX[:, :, :T_i]
        s_BKMT = jnp.einsum("bkmx,bktx->bkmt", q_BKMX, k, preferred_element_type=f32)
        s_BKQUT = s_BKMT.reshape(B, K, Q, U, -1) * (X**-0.5)
        mask_BUT = mask_BLT[:, i * U : (i + 1) * U, :T_i]
        s_BKQUT = jnp.where(mask_BUT[:, None, None], s_BKQUT, NEG_INF)
        s_BKMT = s_BKQUT.reshape(s_BKMT.shape)
        p_BKMT = jnp.exp(s_BKMT - jnp.max(s_BKMT, axis=-1, keepdims=True)).astype(v.dtype)
        l_BKM1 = jnp.sum(p_BKMT.astype(f32), axis=-1, keepdims=True)
        o_BKMX = jnp.einsum("bkmt,bktx->bkmx", p_BKMT, v, preferred_element_type=f32)
        o_BKMX = (o_BKMX / l_BKM1).astype(q_BKQLX.dtype)
        outs.append(o_BKMX.reshape(B, K, Q, U, X))
        saved.append((p_BKMT, l_BKM1, o_BKMX))
    o_BKQLX = outs[0] if blocks == 1 else jnp.concatenate(outs, axis=3)
    return o_BKQLX, (q_BKQLX, k_BKTX, v_BKTX, saved)


def _attention_bwd(blocks, res, do_BKQLX):
    """dS = P * (dP - rowsum(dO * O)) / l per block, from the saved unnormalised P."""
    q_BKQLX, k_BKTX, v_BKTX, saved = res
    B, K, Q, L, X = q_BKQLX.shape
    dt, f32 = q_BKQLX.dtype, jnp.float32
    dkt_BKXT = jnp.zeros((B, K, X, k_BKTX.shape[2]), f32)
    dvt_BKXT = jnp.zeros_like(dkt_BKXT)
    dqs = []
    for i, (p_BKMT, l_BKM1, o_BKMX) in enumerate(saved):
        q_BKMX, U, T_i = _block_rows(q_BKQLX, blocks, i)
        do_BKMX = _block_rows(do_BKQLX.astype(dt), blocks, i)[0]
        k, v = k_BKTX[:, :, :T_i], v_BKTX[:, :, :T_i]
        dp_BKMT = jnp.einsum("bkmx,bktx->bkmt", do_BKMX, v, preferred_element_type=f32)
        d_BKM1 = jnp.sum(do_BKMX.astype(f32) * o_BKMX.astype(f32), axis=-1, keepdims=True)
        ds_BKMT = p_BKMT.astype(f32) * ((dp_BKMT - d_BKM1) * ((X**-0.5) / l_BKM1))
        ds_BKMT = ds_BKMT.astype(dt)
        dq_BKMX = jnp.einsum("bkmt,bktx->bkmx", ds_BKMT, k, preferred_element_type=f32)
        dqs.append(dq_BKMX.astype(dt).reshape(B, K, Q, U, X))
        # dK = dS^T Q and dV = P^T (dO / l) as (Q^T dS)^T and ((dO / l)^T P)^T: the big
        # operands stay untransposed, only the [.., X] ones are transposed.
        dol_BKMX = (do_BKMX.astype(f32) / l_BKM1).astype(dt)
        if can_fix_layouts():
            qt_BKXM = row_major(jnp.swapaxes(q_BKMX, -1, -2))
            dolt_BKXM = row_major(jnp.swapaxes(dol_BKMX, -1, -2))
            dkt = jnp.einsum("bkxm,bkmt->bkxt", qt_BKXM, ds_BKMT, preferred_element_type=f32)
            dvt = jnp.einsum("bkxm,bkmt->bkxt", dolt_BKXM, p_BKMT, preferred_element_type=f32)
        else:  # float32 operands: XLA:CPU may not run these bf16 dots (see row_major)
            ds32, p32 = ds_BKMT.astype(f32), p_BKMT.astype(f32)
            dkt = jnp.einsum("bkmt,bkmx->bkxt", ds32, q_BKMX.astype(f32))
            dvt = jnp.einsum("bkmt,bkmx->bkxt", p32, dol_BKMX.astype(f32))
        dkt_BKXT = dkt_BKXT.at[..., : dkt.shape[-1]].add(dkt)
        dvt_BKXT = dvt_BKXT.at[..., : dvt.shape[-1]].add(dvt)
    dq_BKQLX = dqs[0] if blocks == 1 else jnp.concatenate(dqs, axis=3)
    # the transposes back are kept out of the dots (XLA would fold them into the dots'
    # operand order, which XLA:CPU cannot run in bfloat16)
    dk_BKTX = jnp.swapaxes(row_major(dkt_BKXT), -1, -2).astype(k_BKTX.dtype)
    dv_BKTX = jnp.swapaxes(row_major(dvt_BKXT), -1, -2).astype(v_BKTX.dtype)
    return dq_BKQLX, dk_BKTX, dv_BKTX, None


_attention.defvjp(_attention_fwd, _attention_bwd)
