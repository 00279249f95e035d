"""The training loop: learning, outputs, resume after kill (the CLI's bad-input errors are in
test_cli_errors.py)."""

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from experiments.configs import lm
from mlx_sched.train import loop, plots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**train):
    c = lm.get_config("runlocal")  # in-process: data-parallel over the 8 test devices
    c.train.update(**train)
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    trainer, params, eval_loss = loop.train_from_config(_config(), workdir)
    return workdir, trainer, eval_loss


def test_training_learns_and_writes_outputs(trained):
    workdir, trainer, eval_loss = trained
    records = plots.read_jsonl(workdir / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train] == [5, 10, 15, 20]
    assert [r["step"] for r in evals] == [10, 20]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    assert eval_loss == pytest.approx(evals[-1]["ce"])
    assert eval_loss < np.log(256)  # better than uniform over bytes
    assert (workdir / "loss.png").stat().st_size > 1000
    assert trainer.ckpt.all_steps() == [10, 20]


def test_schedule_warms_up_then_decays():
    tc = loop.TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [loop.lr_at(tc, s) for s in (0, 5, 10, 55, 100)]
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.5)
    assert lrs[2] == pytest.approx(1.0) and lrs[2] > lrs[3] > lrs[4]
    assert lrs[4] == pytest.approx(0.1)


def test_rerun_on_finished_workdir_reuses_it(trained):
    workdir, _, eval_loss = trained
    _, _, again = loop.train_from_config(_config(), workdir)
    assert again == pytest.approx(eval_loss, abs=1e-6)
    keys = [(r["step"], r["split"]) for r in plots.read_jsonl(workdir / "metrics.jsonl")]
    assert keys == sorted(keys, key=lambda k: k[0]) and len(keys) == len(set(keys))


def test_checkpoint_from_before_a_new_config_field_still_resumes(trained):
    """Fields added to ModelConfig later (here: attention, moe) count as their defaults."""
    workdir, _, eval_loss = trained
    meta_file = workdir / "checkpoints" / "20" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    for key in ("attention", "moe"):
        meta["model"].pop(key)
    meta_file.write_text(json.dumps(meta))
    _, _, again = loop.train_from_config(_config(), workdir)
    assert again == pytest.approx(eval_loss, abs=1e-6)


def test_corrupt_latest_checkpoint_resumes_from_the_one_before(trained, tmp_path, caplog):
    """A damaged newest checkpoint is moved aside with a warning; training resumes from the
    previous one and writes a good checkpoint of that step again."""
    workdir = tmp_path / "run"
    shutil.copytree(trained[0], workdir)
    for f in (workdir / "checkpoints" / "20").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"garbage")
    with caplog.at_level(logging.INFO):
        trainer, _, eval_loss = loop.train_from_config(_config(), workdir)
    messages = [r.getMessage() for r in caplog.records]
    assert any("checkpoint step 20 is unreadable" in m for m in messages)
    assert "resumed from step 10 (data position 10)" in messages
    assert (workdir / "checkpoints" / "20.corrupt").is_dir()
    assert trainer.ckpt.all_steps() == [10, 20] and np.isfinite(eval_loss)
    steps = [(r["step"], r["split"]) for r in plots.read_jsonl(workdir / "metrics.jsonl")]
    assert steps == sorted(steps, key=lambda k: k[0]) and len(steps) == len(set(steps))


def test_changed_model_on_same_workdir_is_a_clear_error(trained):
    workdir, _, _ = trained
    c = _config()
    c.model.d_model = 32
    c.model.n_heads = 2
    c.model.n_kv_heads = 1
    with pytest.raises(loop.CheckpointError, match="different model"):
        loop.train_from_config(c, workdir)


def _cli(*args, env=None, check=True):
    cmd = [sys.executable, "-m", "experiments.train", *args]
    full_env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", **(env or {})}
    out = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


RUNLOCAL = "--config=experiments/configs/lm.py:runlocal"


@pytest.mark.slow
def test_killed_run_resumes_and_continues_the_same_curve(tmp_path):
    flags = ["--config.train.ckpt_every=5", "--config.train.steps=20"]
    _cli(RUNLOCAL, f"--workdir={tmp_path / 'ref'}", *flags)
    killed = _cli(
        RUNLOCAL,
        f"--workdir={tmp_path / 'b'}",
        *flags,
        env={"MLX_SCHED_KILL_AT_STEP": "12"},
        check=False,
    )
    assert killed.returncode == -9  # SIGKILL at step 12
    ckpts = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    # step 5 is complete; the async save of step 10 may have been cut short (left as
    # orbax's temporary folder), in which case it must not be used
    assert "5" in ckpts and not any(c.startswith(("15", "20")) for c in ckpts)
    latest = "10" if "10" in ckpts else "5"
    resumed = _cli(RUNLOCAL, f"--workdir={tmp_path / 'b'}", *flags)
    assert f"resumed from step {latest} " in resumed.stderr
    ref = plots.read_jsonl(tmp_path / "ref" / "metrics.jsonl")
    got = plots.read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in ref]
    for a, b in zip(ref, got, strict=True):
        key = "loss" if a["split"] == "train" else "ce"
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a, b)


def test_metrics_are_valid_jsonl(trained):
    workdir, _, _ = trained
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        assert isinstance(json.loads(line)["step"], int)
