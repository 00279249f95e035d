"""Keep freed heap memory in the process, so XLA:CPU's per-step buffers stop page-faulting.

XLA:CPU allocates a train step's temporaries as one buffer per execution
(hundreds of MB for the `lm` config) and frees it afterwards. glibc serves
such a block with a fresh `mmap` and returns it with `munmap`, so every step
touches every page anew: about 1.4e5 minor page faults and a fifth to a
quarter of the step's wall time in the kernel on the 2-core CI machine
(`experiments/bench_train.py --malloc=system` vs `--malloc=retain`).

`retain_freed_memory()` tells glibc to serve large blocks from the heap and
never give them back. The thread arenas that XLA's worker threads would
otherwise use cannot grow that large, so all threads must share the main
arena: this must run before the process starts JAX's backend (before the first
computation or `jax.devices()`), or it has no effect on those threads. The
cost is that the process keeps its peak heap size.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def retain_freed_memory() -> bool:
    """Configure glibc malloc as above; False where that is not possible (not glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    return all(mallopt(param, value) == 1 for param, value in settings)
