"""Checkpoint round trip, resharded restore, incomplete and corrupt checkpoints."""

import asyncio
import logging
import pathlib
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import sharding
from mlx_sched.train import checkpoint, loop
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


def _two_checkpoints_newest_corrupt(tmp_path, tiny_cfg):
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    params, opt = _state(tiny_cfg, mesh)
    ckpt = Checkpointer(tmp_path / "ck")
    for step in (5, 10):
        ckpt.save(step, params, opt, {"step": step, "data_position": step})
    ckpt.close()
    for f in pathlib.Path(tmp_path / "ck" / "10").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"garbage")
    return params, opt


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_cfg, caplog):
    params, opt = _two_checkpoints_newest_corrupt(tmp_path, tiny_cfg)
    ckpt = Checkpointer(tmp_path / "ck")
    with caplog.at_level(logging.WARNING):
        step, p2, o2, meta = ckpt.restore_latest(params, opt)
    assert step == 5 and meta["data_position"] == 5
    _assert_trees_equal(p2, params)
    _assert_trees_equal(o2, opt)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "checkpoint step 10 is unreadable" in warning and "resuming from step 5" in warning
    assert (tmp_path / "ck" / "10.corrupt").is_dir() and ckpt.all_steps() == [5]
    ckpt.save(10, params, opt, {"step": 10, "data_position": 10})  # training goes on past it
    ckpt.close()
    assert Checkpointer(tmp_path / "ck").latest_step() == 10


def test_no_readable_checkpoint_is_a_clear_error_and_moves_nothing(tmp_path, tiny_cfg):
    params, opt = _two_checkpoints_newest_corrupt(tmp_path, tiny_cfg)
    for f in pathlib.Path(tmp_path / "ck" / "5").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* is readable \(steps \[10, 5\]"):
        Checkpointer(tmp_path / "ck").restore_latest(params, opt)
    assert not list((tmp_path / "ck").glob("*.corrupt"))


def test_refused_checkpoint_stops_the_search(tmp_path, tiny_cfg):
    params, opt = _two_checkpoints_newest_corrupt(tmp_path, tiny_cfg)

    def refuse(step, meta):
        raise CheckpointError(f"step {step} is for another model")

    with pytest.raises(CheckpointError, match="step 10 is for another model"):
        Checkpointer(tmp_path / "ck").restore_latest(params, opt, check=refuse)
    assert Checkpointer(tmp_path / "ck").restore_latest(params, opt) is not None


def test_reads_left_behind_by_a_failed_restore_print_nothing(caplog):
    """Orbax's pending reads report into its closed event loop after a failed restore: "Event
    loop is closed" (unraisable) and "exception was never retrieved" (asyncio's log)."""
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(lambda: None)
    except RuntimeError as e:
        orphan = e
    assert checkpoint._is_orphaned_read(orphan, orphan.__traceback__)
    try:
        raise RuntimeError("Event loop is closed")  # the same words from elsewhere: kept
    except RuntimeError as e:
        assert not checkpoint._is_orphaned_read(e, e.__traceback__)
    checkpoint._quiet_orphaned_reads()
    assert sys.unraisablehook.drops_orphaned_reads
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        logging.getLogger("asyncio").error("Future exception was never retrieved")
        logging.getLogger("asyncio").error("a real asyncio error")
    assert [r.getMessage() for r in caplog.records] == ["a real asyncio error"]
