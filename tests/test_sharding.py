"""Meshes, the rules table, and sharded == single-device for forward and train step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import sharding
from mlx_sched.train import loop
from mlx_sched.train.steps import train_step
from models import Transformer

LAYOUTS = {
    "data_x_tensor": {"data": 2, "tensor": 4},
    "fsdp": {"data": 2, "fsdp": 4},
    "fsdp_x_tensor": {"fsdp": 4, "tensor": 2},
}


def test_mesh_sizes_and_fill():
    mesh = sharding.make_mesh({"data": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "expert": 1, "tensor": 2}
    assert sharding.make_mesh(devices=jax.devices()[:1]).size == 1
    assert sharding.make_mesh({"data": 8}).size == 8


@pytest.mark.parametrize(
    "axes, message",
    [
        ({"data": 3}, "uses 3 devices but there are 8"),
        ({"data": -1, "tensor": 3}, "needs a multiple of 3"),
        ({"data": -1, "tensor": -1}, "at most one"),
        ({"data": 0}, ">= 1 or -1"),
        ({"model": 2}, "unknown mesh axis"),
    ],
)
def test_mesh_errors_are_clear(axes, message):
    with pytest.raises(sharding.MeshError, match=message):
        sharding.make_mesh(axes)


def test_logical_to_spec_rules():
    shape = {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    assert sharding.logical_to_spec(("embed", "mlp"), shape) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("act_batch", None), shape) == P(("data", "fsdp"), None)
    # size-1 and absent axes are dropped; a mesh axis is used once per spec
    assert sharding.logical_to_spec(("expert", "embed"), shape) == P(None, "fsdp")
    assert sharding.logical_to_spec(("heads", "kv_heads"), shape) == P("tensor", None)
    # a dim the axis does not divide is replicated rather than failing
    assert sharding.logical_to_spec(("kv_heads",), shape, (3,)) == P(None)
    with pytest.raises(KeyError, match="no rule"):
        sharding.logical_to_spec(("nonsense",), shape)


def _sharded_params(model, mesh):
    _, params = nnx.split(model, nnx.Param)
    return sharding.place(params, sharding.state_shardings(mesh, params))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sharded_forward_equals_single_device(tiny_cfg, layout):
    model = Transformer(tiny_cfg, nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, 256)
    ref = np.asarray(model(tokens))
    mesh = sharding.make_mesh(LAYOUTS[layout])
    graphdef, _ = nnx.split(model, nnx.Param)
    params = _sharded_params(model, mesh)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5)
    wq = params["layers"][0]["attn"]["wq"][...]
    expected = {"data_x_tensor": P(None, "tensor", None), "fsdp": P("fsdp", None, None)}
    if layout in expected:
        assert wq.sharding.spec == expected[layout]


@pytest.mark.parametrize("layout", ["data_x_tensor", "fsdp"])
def test_sharded_train_step_equals_single_device(tiny_cfg, layout):
    tc = loop.TrainConfig(steps=10, warmup_steps=1)
    tx = loop.make_optimizer(tc)
    model = Transformer(tiny_cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    batch = jax.random.randint(jax.random.key(1), (8, 17), 0, 256)
    step = functools.partial(train_step, graphdef, tx, 0)

    ref_p, _, ref_m = jax.jit(step)(params, tx.init(params), batch, jnp.int32(0))

    mesh = sharding.make_mesh(LAYOUTS[layout])
    p_sh = sharding.state_shardings(mesh, params)
    o_sh = sharding.optimizer_shardings(tx, params, p_sh, mesh)
    b_sh = sharding.named_sharding(mesh, ("act_batch", None))
    sp = sharding.place(params, p_sh)
    with jax.set_mesh(mesh):
        so = jax.jit(tx.init, out_shardings=o_sh)(sp)
        fn = jax.jit(step, in_shardings=(p_sh, o_sh, b_sh, None), out_shardings=(p_sh, o_sh, None))
        out_p, out_o, out_m = fn(sp, so, jax.device_put(batch, b_sh), jnp.int32(0))
    np.testing.assert_allclose(float(out_m["loss"]), float(ref_m["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(out_m["grad_norm"]), float(ref_m["grad_norm"]), rtol=1e-4)
    for a, b in zip(jax.tree.leaves(out_p), jax.tree.leaves(ref_p), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    # optimizer moments are sharded like their parameters
    mu_wq = jax.tree.leaves(out_o[1][0].mu["layers"][0]["attn"]["wq"])[0]
    assert mu_wq.sharding.spec == out_p["layers"][0]["attn"]["wq"][...].sharding.spec
