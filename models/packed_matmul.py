"""Serving weights packed once for the native CPU matmul (models/native/packed_matmul.cc).

XLA:CPU's dot packs its weight operand on every call; at the few rows of a decode
step that packing costs more than the arithmetic (a 32 x 512 x 1536 bf16 dot runs at
~200 GFLOP/s). For serving on one CPU device the runner packs each dense projection
once (`pack_params`) into panels of 32 columns, and `models.layers.dot` sends a
packed weight to the native kernel (`packed_dot`).

A packed weight is recognised by its dtype: uint32 words holding float32, or uint16
holding bfloat16. Its shape is `(*n_dims, K)`: the weight's output dimensions (in
the order of the einsum's output) and then K, the product of the contracted ones
(in the order of the einsum's first operand). Memory holds the panels: float32
`[N/32][K][32]`, bfloat16 `[N/32][K/2][32][2]` (pairs of k, AVX512-BF16's layout).
A weight whose N is not a multiple of 32 (or, in bfloat16, whose K is odd) stays
as it is, on XLA's dot.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from models import native_kernels

SOURCE = native_kernels.SOURCE.parent / "packed_matmul.cc"
TARGET = "mlx_packed_matmul"
NR = 32  # columns per panel
PACKED_DTYPES = {jnp.dtype(jnp.float32): jnp.uint32, jnp.dtype(jnp.bfloat16): jnp.uint16}

# the projections a serving step multiplies by, and the einsum each is used with
EQS = {
    ("attn", "wq"): "td,dhx->thx",
    ("attn", "wk"): "td,dkx->tkx",
    ("attn", "wv"): "td,dkx->tkx",
    ("attn", "wo"): "thx,hxd->td",
    ("mlp", "w_gate"): "td,df->tf",
    ("mlp", "w_up"): "td,df->tf",
    ("mlp", "w_down"): "tf,fd->td",
    ("lm_head",): "td,dv->tv",
}
TIED_HEAD_EQ = "td,vd->tv"  # the tied embedding table as the output head


@functools.cache
def available() -> bool:
    """True when the native matmul is built and registered for this process's CPU backend."""
    if not native_kernels.available():  # the same switches, compiler and cache
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(native_kernels._build(SOURCE)))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.MlxPackedMatmul), platform="cpu")
    except Exception as e:  # a failed build: XLA's dot
        logging.warning("native packed matmul unavailable, using XLA's dot: %s", e)
        return False
    return True


def is_packed(w) -> bool:
    return jnp.dtype(w.dtype) in (jnp.dtype(jnp.uint32), jnp.dtype(jnp.uint16))


def _letters(eq: str) -> tuple[str, str, str]:
    ins, out = eq.replace(" ", "").split("->")
    a, b = ins.split(",")
    return a, b, out


def pack(w: jax.Array, eq: str) -> jax.Array:
    """`w`, the second operand of `eq`, packed; `w` itself where it cannot be."""
    xs, ws, outs = _letters(eq)
    contracted = [c for c in xs if c in ws and c not in outs]
    n_letters = [c for c in outs if c in ws]
    if sorted(contracted + n_letters) != sorted(ws) or jnp.dtype(w.dtype) not in PACKED_DTYPES:
        return w
    dims = dict(zip(ws, w.shape, strict=True))
    n_dims = tuple(dims[c] for c in n_letters)
    N, K = int(np.prod(n_dims)), int(np.prod([dims[c] for c in contracted]))
    bf16 = w.dtype == jnp.bfloat16
    if N % NR or (bf16 and K % 2):
        return w
    w_NK = jnp.einsum(f"{ws}->{''.join(n_letters + contracted)}", w).reshape(N, K)
    if bf16:  # [N/32][K/2][32][2]
        panels = w_NK.reshape(N // NR, NR, K // 2, 2).transpose(0, 2, 1, 3)
    else:  # [N/32][K][32]
        panels = w_NK.reshape(N // NR, NR, K).transpose(0, 2, 1)
    words = jax.lax.bitcast_convert_type(panels, PACKED_DTYPES[jnp.dtype(w.dtype)])
    return words.reshape(*n_dims, K)


def packed_dot(eq: str, x: jax.Array, w: jax.Array, out_dtype=jnp.float32) -> jax.Array:
    """einsum `eq` of `x` and a packed `w` on the native kernel: float32 accumulation, the
    result float32 or rounded to bfloat16 (`out_dtype`) by the kernel as it stores it (the
    same values as a float32 result converted by XLA, without the extra pass)."""
    xs, ws, outs = _letters(eq)
    contracted = [c for c in xs if c in ws and c not in outs]
    m_letters = [c for c in xs if c not in contracted]
    n_letters = [c for c in outs if c in ws]
    if sorted(outs) != sorted(m_letters + n_letters):
        raise ValueError(f"packed_dot: unsupported einsum {eq}")
    dtype = jnp.float32 if w.dtype == jnp.uint32 else jnp.bfloat16
    dims = dict(zip(xs, x.shape, strict=True))
    m_dims = tuple(dims[c] for c in m_letters)
    M, K = int(np.prod(m_dims)), w.shape[-1]
    x_MK = jnp.einsum(f"{xs}->{''.join(m_letters + contracted)}", x.astype(dtype)).reshape(M, K)
    N = int(np.prod(w.shape[:-1]))
    out_dtype = jnp.dtype(out_dtype)
    if out_dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"packed_dot: output dtype {out_dtype} is not float32 or bfloat16")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((M, N), out_dtype))
    y = call(x_MK, w).reshape(*m_dims, *w.shape[:-1])
    lo = "".join(m_letters + n_letters)
    return y if lo == outs else jnp.einsum(f"{lo}->{outs}", y)


def pack_params(params, tie_embeddings: bool):
    """A serving copy of a Transformer's nnx.Param state with its dense projections packed
    (MoE experts, norms and the embedding table used for lookups stay as they are; a tied
    table is packed as the output head only where the caller keeps its own lookup copy)."""
    from flax import nnx

    flat = dict(nnx.to_flat_state(params))
    out = {}
    for path, var in flat.items():
        names = tuple(str(p) for p in path)
        eq = EQS.get(names[-2:]) or EQS.get(names[-1:])
        if names == ("embed",) and tie_embeddings:
            eq = TIED_HEAD_EQ
        value = var.get_value() if hasattr(var, "get_value") else var.value
        if eq is not None and value.ndim == len(_letters(eq)[1]):
            var = var.replace(pack(value, eq))
        out[path] = var
    return nnx.from_flat_state(out)
