"""The packed step bundle: one host buffer that round-trips every small array bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlx_sched.serve.batches import PACK_MAX_BYTES, Packed, unpacking


def _bundle():
    rng = np.random.default_rng(0)
    odd = np.array([np.nan, -0.0, np.inf, -np.inf, 1e-45, 3.4e38], np.float32)
    return {
        "tokens": rng.integers(-5, 1 << 30, (3, 4)).astype(np.int32),
        "temperature": np.concatenate([odd, rng.random(2).astype(np.float32)]),
        "words": np.array([0, 1, 0xFFFFFFFF, 0x80000000], np.uint32),
        "empty": np.zeros((0, 5), np.int32),
        "scalarish": np.array([7], np.int32),
        "big": np.ones(PACK_MAX_BYTES // 4 + 1, np.float32),  # travels on its own
        "bytes": np.arange(6, dtype=np.int8),  # not a 4-byte dtype: on its own
    }


def _same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def test_pack_unpack_round_trips_bit_for_bit_on_host_and_in_a_jitted_step():
    bundle = _bundle()
    packed = Packed.pack(bundle)
    assert set(packed.rest) == {"big", "bytes"}
    assert packed.flat.dtype == np.int32 and packed.flat.size == 12 + 8 + 4 + 0 + 1
    for name, value in packed.unpack().items():
        _same_bits(value, bundle[name])
    on_device = jax.device_put(packed)
    out = jax.jit(unpacking(lambda x, b: {n: v for n, v in b.items()}))(0, on_device)
    for name, value in out.items():
        _same_bits(value, bundle[name])


def test_unpacking_passes_leading_and_keyword_arguments():
    step = unpacking(lambda x, b, scale=1: b["a"] * x * scale)
    assert step(2, Packed.pack({"a": np.array([3], np.int32)}), scale=5)[0] == 30


def test_one_layout_per_shape_so_a_compiled_step_takes_every_bundle_of_its_shape():
    f = jax.jit(unpacking(lambda b: b["x"].sum() + b["y"].sum()))
    exe = f.lower(Packed.pack({"x": np.zeros(3, np.int32), "y": np.zeros(2, np.float32)}))
    exe = exe.compile()
    got = exe(Packed.pack({"x": np.arange(3, dtype=np.int32), "y": np.ones(2, np.float32)}))
    assert float(got) == 5.0


def test_a_small_device_array_is_refused():
    with pytest.raises(ValueError, match="small device array"):
        Packed.pack({"q": jnp.zeros(4, jnp.float32)})
    assert "q" in Packed.pack({"q": jnp.zeros(4, jnp.int8)}).rest  # not a packed dtype
    big = jnp.zeros(PACK_MAX_BYTES // 4 + 1, jnp.float32)
    assert "q" in Packed.pack({"q": big}).rest  # a large one travels on its own
