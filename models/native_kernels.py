"""Native CPU kernels as XLA FFI custom calls, built from source on first use.

`paged_decode` reads a sequence's K and V straight from the paged cache, with
no gathered copy (the pure-JAX kernel must gather the pages first, and on a
CPU that copy, not the arithmetic, dominates decode attention). The C++
source in models/native/ is compiled with the system's C++ compiler (CXX,
default g++) into a cache folder (MLX_SCHED_KERNEL_CACHE, default
~/.cache/mlx_sched/kernels) and registered with XLA. Where that is not
possible (no compiler, a failed build, not a CPU backend,
MLX_SCHED_NATIVE=0), `available()` is False, a warning carries the reason
(for a failed build, the compiler's error output), and callers use the
pure-JAX kernel, which computes the same thing.

A cached library is reused only when its name's key, `cache_key()`, matches:
a hash of the source, the compiler flags and libraries, the JAX FFI headers'
folder and JAX version, the compiler (its resolved path and `--version`
output) and the CPU's instruction-set flags (/proc/cpuinfo; elsewhere the
machine and processor names). The build uses `-march=native`, so a cache
folder shared between machines (a network home) holds one build per CPU
kind and never loads one built for another CPU.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = pathlib.Path(__file__).parent / "native" / "paged_decode.cc"
TARGET = "mlx_native_paged_attention"


def _cache_dir() -> pathlib.Path:
    return pathlib.Path(
        os.environ.get("MLX_SCHED_KERNEL_CACHE", "~/.cache/mlx_sched/kernels")
    ).expanduser()


FLAGS = [
    "-O3",
    "-march=native",
    # not -ffast-math: the kernel's -inf sentinels need IEEE infinities (see the .cc)
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fopenmp-simd",
    "-shared",
    "-fPIC",
    "-std=c++17",
    "-w",
]
LIBS = ["-lmvec", "-lm"]  # vectorised expf
ERROR_CHARS = 2000  # of the compiler's error output in the fallback warning


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def _compiler_identity(cxx: str) -> str:
    """The compiler's resolved path and `--version` output (a failing compiler still gets one)."""
    try:
        r = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
        version = f"{r.returncode}\n{r.stdout}{r.stderr}"
    except (OSError, subprocess.SubprocessError) as e:
        version = repr(e)
    return f"{os.path.realpath(cxx)}\n{version}"


def _cpu_flags() -> str:
    """The instruction sets -march=native compiles for: sorted /proc/cpuinfo flags on Linux."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() in ("flags", "Features"):  # x86, arm
                return " ".join(sorted(value.split()))
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def cache_key(cxx: str, source: pathlib.Path = SOURCE) -> str:
    """Name key of the library `cxx` builds from `source` on this CPU: changes with any input."""
    headers = sorted(source.parent.glob("*.h"))  # included by the sources
    parts = [
        source.read_bytes(),
        *(h.name.encode() + h.read_bytes() for h in headers),
        " ".join([*FLAGS, *LIBS]).encode(),
        jax.ffi.include_dir().encode(),
        jax.__version__.encode(),
        _compiler_identity(cxx).encode(),
        _cpu_flags().encode(),
    ]
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little") + part)  # length-prefixed: no ambiguous joins
    return h.hexdigest()[:16]


def _build(source: pathlib.Path = SOURCE) -> pathlib.Path:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found")
    out = _cache_dir() / f"{source.stem}_{cache_key(cxx, source)}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    include = jax.ffi.include_dir()
    cmd = [cxx, *FLAGS, f"-I{include}", str(source), "-o", str(tmp), *LIBS]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    tmp.rename(out)  # atomic: concurrent builders never see a half-written library
    return out


def _reason(e: Exception) -> str:
    """Why the kernel is unavailable; for a failed build, the start of the compiler's errors."""
    if isinstance(e, subprocess.CalledProcessError):
        # the first error is the cause; those after it often cascade from it
        errors = (e.stderr or e.stdout or "").strip()
        if len(errors) > ERROR_CHARS:
            errors = errors[:ERROR_CHARS] + " [...]"
        return f"build failed, {e.cmd[0]} exited with {e.returncode}:\n{errors}"
    return str(e)


@functools.cache
def available() -> bool:
    """True when the native kernel is built and registered for this process's CPU backend."""
    if os.environ.get("MLX_SCHED_NATIVE", "1") == "0" or jax.default_backend() != "cpu":
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build()))
        jax.ffi.register_ffi_target(
            TARGET, jax.ffi.pycapsule(lib.MlxPagedAttention), platform="cpu"
        )
    except Exception as e:  # a missing compiler, a failed build: fall back to pure JAX
        logging.warning("native paged-decode kernel unavailable, using pure JAX: %s", _reason(e))
        return False
    return True


def _require() -> None:
    if not available():  # registers the targets on first use
        raise RuntimeError("the native paged-attention kernels are unavailable (see the warning)")


def _io_dtype(q) -> jnp.dtype:
    """The kernels take and give bfloat16 as it is, anything else as float32."""
    return jnp.dtype(jnp.bfloat16 if q.dtype == jnp.bfloat16 else jnp.float32)


def paged_decode(q_GHX, k_cache, v_cache, pages_GW, kv_len_G, layer: int) -> jax.Array:
    """Dense causal decode attention of one query per group over its pages (bfloat16 out for
    a bfloat16 q, rounded once from float32 arithmetic; float32 otherwise).

    q [G, H, X]; caches [N, P, Z, K, X] float32 or [N, P, Z, K, X/2] packed bf16 (uint32);
    query g sees positions [0, kv_len[g]) of its pages; kv_len 0 gives zeros. The kernel
    of `paged_prefill`, each query its own row.
    """
    rows = jnp.arange(q_GHX.shape[0], dtype=jnp.int32)
    return paged_prefill(q_GHX, k_cache, v_cache, pages_GW, rows, kv_len_G, layer)


def paged_prefill(q_THX, k_cache, v_cache, pages_RW, row_T, kv_len_T, layer: int) -> jax.Array:
    """Dense causal attention of prefill tokens over their sequences' pages (out dtype as
    `paged_decode`'s).

    Token t belongs to the sequence whose page-table row is `pages_RW[row_T[t]]` and sees
    positions [0, kv_len_T[t]) (kv_len 0 gives zeros). The same result as one decode query
    per token over its row, but consecutive tokens of one row share a task that reads the
    row's pages once per block of 16 queries rather than once per query.
    """
    _require()
    T, H, X = q_THX.shape
    dt = _io_dtype(q_THX)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((T, H, X), dt))
    return call(
        q_THX.astype(dt),
        k_cache,
        v_cache,
        pages_RW.astype(jnp.int32),
        row_T.astype(jnp.int32),
        kv_len_T.astype(jnp.int32),
        layer=np.int64(layer),
    )
