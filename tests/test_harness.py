"""The test harness itself: guards in conftest.py."""

import jax.numpy as jnp
import numpy as np
import pytest


def test_approx_refuses_jax_arrays_and_accepts_numbers():
    with pytest.raises(TypeError, match="JAX array"):
        pytest.approx(jnp.float32(1.0))
    with pytest.raises(TypeError, match="JAX array"):
        pytest.approx([1.0, jnp.float32(2.0)])
    assert pytest.approx(1.0) == 1.0
    assert np.asarray([1.0, 2.0]) == pytest.approx(np.asarray(jnp.asarray([1.0, 2.0])))
