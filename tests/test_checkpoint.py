"""Checkpoint round trip, resharded restore, incomplete and corrupt checkpoints."""

import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

import sharding
from mlx_sched.train import loop
from mlx_sched.train.checkpoint import Checkpointer, CheckpointError, open_existing
from models import Transformer


def _state(cfg, mesh):
    tc = loop.TrainConfig(steps=10, warmup_steps=1)
    tx = loop.make_optimizer(tc)
    _, params = nnx.split(Transformer(cfg, nnx.Rngs(0)), nnx.Param)
    p_sh = sharding.state_shardings(mesh, params)
    params = sharding.place(params, p_sh)
    opt = jax.jit(tx.init, out_shardings=sharding.optimizer_shardings(tx, params, p_sh, mesh))(
        params
    )
    return params, opt


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip(tmp_path, tiny_cfg):
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    params, opt = _state(tiny_cfg, mesh)
    ckpt = Checkpointer(tmp_path / "ck")
    ckpt.save(7, params, opt, {"step": 7, "data_position": 7})
    ckpt.close()
    ckpt2, step = open_existing(tmp_path / "ck")
    p2, o2, meta = ckpt2.restore(step, params, opt)
    assert step == 7 and meta == {"step": 7, "data_position": 7}
    _assert_trees_equal(p2, params)
    _assert_trees_equal(o2, opt)


def test_restore_onto_a_different_mesh(tmp_path, tiny_cfg):
    mesh_a = sharding.make_mesh({"data": 2, "tensor": 4})
    mesh_b = sharding.make_mesh({"fsdp": 8})
    params, opt = _state(tiny_cfg, mesh_a)
    ckpt = Checkpointer(tmp_path / "ck")
    ckpt.save(1, params, opt, {"step": 1, "data_position": 1})
    ckpt.close()
    like_p, like_o = _state(tiny_cfg, mesh_b)
    p2, o2, _ = Checkpointer(tmp_path / "ck").restore(1, like_p, like_o)
    _assert_trees_equal(p2, params)
    _assert_trees_equal(o2, opt)
    wq = p2["layers"][0]["attn"]["wq"][...]
    assert wq.sharding.mesh.shape == mesh_b.shape
    assert wq.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, None)


def test_incomplete_step_is_moved_aside_not_latest(tmp_path, tiny_cfg):
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    params, opt = _state(tiny_cfg, mesh)
    ckpt = Checkpointer(tmp_path / "ck")
    ckpt.save(1, params, opt, {"step": 1, "data_position": 1})
    ckpt.close()
    # a step folder without orbax's completion metadata: a half-written save
    half = tmp_path / "ck" / "2"
    (half / "params").mkdir(parents=True)
    (half / "params" / "junk").write_bytes(b"\x00" * 10)
    # orbax's own temporary folder from a killed save
    (tmp_path / "ck" / "3.orbax-checkpoint-tmp-99").mkdir()
    ckpt2 = Checkpointer(tmp_path / "ck")
    assert ckpt2.latest_step() == 1
    assert (tmp_path / "ck" / "2.incomplete").exists() and not half.exists()
    p2, _, _ = ckpt2.restore(1, params, opt)
    _assert_trees_equal(p2, params)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, tiny_cfg):
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    params, opt = _state(tiny_cfg, mesh)
    ckpt = Checkpointer(tmp_path / "ck")
    ckpt.save(5, params, opt, {"step": 5, "data_position": 5})
    ckpt.close()
    for f in pathlib.Path(tmp_path / "ck" / "5" / "params").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable.*delete that folder"):
        Checkpointer(tmp_path / "ck").restore(5, params, opt)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        open_existing(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        open_existing(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no checkpoint for step 3"):
        Checkpointer(tmp_path / "empty").restore(3, {}, {})
