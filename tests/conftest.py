"""Test set-up: eight simulated CPU devices (set before jax is imported anywhere)."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent XLA compilation cache makes the developer's loop fast from its second run on
# (most of the suite's time is compiling small engines). CI points it at a fresh folder, so it
# measures a newcomer's cold run; MLX_SCHED_TEST_JAX_CACHE=0 turns it off. Set through the
# environment so the CLI tests' subprocesses share it.
_cache = os.environ.get("MLX_SCHED_TEST_JAX_CACHE", "~/.cache/mlx_sched/jax_tests")
if _cache != "0":
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser(_cache))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

from models.config import ModelConfig  # noqa: E402


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return ModelConfig(
        vocab_size=264, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128
    )


@pytest.fixture
def naive_attention():
    """Dense causal attention by loops over numpy arrays [B, L, H, X] / [B, L, K, X]: the
    reference the attention kernels are checked against."""

    def attend(q, k, v):
        import numpy as np

        B, L, H, X = q.shape
        K = k.shape[2]
        out = np.zeros_like(q)
        for b in range(B):
            for h in range(H):
                kv = h // (H // K)
                for i in range(L):
                    s = k[b, : i + 1, kv] @ q[b, i, h] / np.sqrt(X)
                    p = np.exp(s - s.max())
                    out[b, i, h] = (p / p.sum()) @ v[b, : i + 1, kv]
        return out

    return attend


_approx = pytest.approx


def _approx_without_jax_arrays(expected, *args, **kwargs):
    """pytest.approx, refusing JAX arrays: pytest >= 9.2 reaches `arr.flat`, which JAX arrays do
    not implement, so such a comparison passes or fails depending on the pytest version."""
    items = expected.values() if isinstance(expected, dict) else expected
    items = items if isinstance(items, list | tuple | type({}.values())) else ()
    if isinstance(expected, jax.Array) or any(isinstance(x, jax.Array) for x in items):
        raise TypeError("pytest.approx given a JAX array: convert it with float() or np.asarray()")
    return _approx(expected, *args, **kwargs)


pytest.approx = _approx_without_jax_arrays


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()}"
