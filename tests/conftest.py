"""Test set-up: eight simulated CPU devices (set before jax is imported anywhere)."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from models.config import ModelConfig  # noqa: E402


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return ModelConfig(
        vocab_size=264, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128
    )


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
