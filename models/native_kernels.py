"""Native CPU kernels as XLA FFI custom calls, built from source on first use.

`paged_decode` reads a sequence's K and V straight from the paged cache, with
no gathered copy (the pure-JAX kernel must gather the pages first, and on a
CPU that copy, not the arithmetic, dominates decode attention). The C++
source in models/native/ is compiled once per machine with the system's
C++ compiler into a cache folder (MLX_SCHED_KERNEL_CACHE, default
~/.cache/mlx_sched/kernels) and registered with XLA. Where that is not
possible (no compiler, not a CPU backend, MLX_SCHED_NATIVE=0), `available()`
is False and callers use the pure-JAX kernel, which computes the same thing.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = pathlib.Path(__file__).parent / "native" / "paged_decode.cc"
TARGET = "mlx_paged_decode"


def _cache_dir() -> pathlib.Path:
    return pathlib.Path(
        os.environ.get("MLX_SCHED_KERNEL_CACHE", "~/.cache/mlx_sched/kernels")
    ).expanduser()


FLAGS = [
    "-O3",
    "-march=native",
    "-ffast-math",
    "-fopenmp-simd",
    "-shared",
    "-fPIC",
    "-std=c++17",
    "-w",
]
LIBS = ["-lmvec", "-lm"]  # vectorised expf


def _build() -> pathlib.Path:
    include = jax.ffi.include_dir()
    recipe = " ".join([*FLAGS, *LIBS, include, jax.__version__]).encode()
    key = hashlib.sha256(SOURCE.read_bytes() + recipe).hexdigest()[:16]
    out = _cache_dir() / f"paged_decode_{key}.so"
    if out.exists():
        return out
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    cmd = [cxx, *FLAGS, f"-I{include}", str(SOURCE), "-o", str(tmp), *LIBS]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    tmp.rename(out)  # atomic: concurrent builders never see a half-written library
    return out


@functools.cache
def available() -> bool:
    """True when the native kernel is built and registered for this process's CPU backend."""
    if os.environ.get("MLX_SCHED_NATIVE", "1") == "0" or jax.default_backend() != "cpu":
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build()))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.MlxPagedDecode), platform="cpu")
    except Exception as e:  # a missing compiler or headers: fall back to pure JAX
        logging.warning("native paged-decode kernel unavailable (%s); using pure JAX", e)
        return False
    return True


def paged_decode(q_GHX, k_cache, v_cache, pages_GW, kv_len_G, layer: int) -> jax.Array:
    """Dense causal decode attention of one query per group over its pages (float32 out).

    q [G, H, X]; caches [N, P, Z, K, X] float32 or [N, P, Z, K, X/2] packed bf16 (uint32);
    query g sees positions [0, kv_len[g]) of its pages; kv_len 0 gives zeros.
    """
    G, H, X = q_GHX.shape
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((G, H, X), jnp.float32))
    return call(
        q_GHX.astype(jnp.float32),
        k_cache,
        v_cache,
        pages_GW.astype(jnp.int32),
        kv_len_G.astype(jnp.int32),
        layer=np.int64(layer),
    )
