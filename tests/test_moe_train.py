"""Training an MoE model: router metrics in the logs, mesh checks, the routing sweep's config."""

import dataclasses
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from experiments import sweep
from experiments.configs import moe_routing
from mlx_sched.train import loop, plots, steps
from models import ConfigError, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """runlocal on the 8 test devices, expert-parallel: mesh data=2 x expert=4."""
    workdir = tmp_path_factory.mktemp("moe")
    c = moe_routing.get_config("runlocal")
    c.mesh.update(data=2, expert=4)
    c.train.update(steps=10, log_every=5, eval_every=10, ckpt_every=10)
    trainer, params, eval_loss = loop.train_from_config(c, workdir)
    return workdir, trainer, params, eval_loss


def test_router_metrics_are_logged(trained):
    workdir, trainer, _, eval_loss = trained
    records = plots.read_jsonl(workdir / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [5, 10] and train[-1]["loss"] < train[0]["loss"]
    for r in train:
        tpe = r["layer_1/tokens_per_expert"]
        assert len(tpe) == 4 and sum(tpe) == 8 * 64  # top-1: every token of the batch once
        assert r["layer_1/load_imbalance"] == pytest.approx(max(tpe) / (sum(tpe) / 4))
        for name in ("aux_loss", "z_loss", "router_entropy", "dropped"):
            assert isinstance(r[f"layer_1/{name}"], float)
        assert r["aux_loss"] > 0  # the weighted router losses are part of the training loss
    assert trainer.num_params > 0 and eval_loss > 0


def test_evaluate_in_serve_mode_and_under_another_capacity(trained):
    _, trainer, params, eval_loss = trained
    assert trainer.evaluate(params) == pytest.approx(eval_loss)
    served = trainer.evaluate(params, mode="serve")
    moe = dataclasses.replace(trainer.model_cfg.moe, eval_capacity_factor=0.1)
    tiny = dataclasses.replace(trainer.model_cfg, moe=moe)
    starved = trainer.evaluate(params, model_cfg=tiny)
    # a barely trained model: the routing form changes the loss a little, but it does change it
    assert abs(served - eval_loss) < 0.1 and abs(starved - eval_loss) > 1e-5


def test_experts_not_dividing_the_expert_axis_fail_before_training(tmp_path):
    c = moe_routing.get_config("runlocal")
    c.mesh.update(data=1, expert=8)
    with pytest.raises(ConfigError, match="num_experts=4 is not divisible by the 8 devices"):
        loop.train_from_config(c, tmp_path)


def test_aux_metrics_keep_scalars_and_vectors():
    aux = {"layer_1": {"loss": 1.0, "dropped": jnp.float32(0.5), "tokens_per_expert": jnp.ones(4)}}
    out = steps._aux_metrics(aux)
    assert set(out) == {"layer_1/dropped", "layer_1/tokens_per_expert"}
    assert loop._to_json(out["layer_1/tokens_per_expert"]) == [1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("variant, n_points", [("default", 4 * 4 + 3), ("long", 4)])
def test_sweep_points_are_valid_model_configs(variant, n_points):
    module, _ = sweep.load_module("experiments/configs/moe_routing.py")
    points = sweep.points_of(module, variant)
    names = [p["name"] for p in points]
    assert len(names) == n_points and any(n.startswith("dense") for n in names)
    for point in points:
        config = sweep.point_config(module, variant, point)
        cfg = ModelConfig.from_dict(config.model)
        if point["name"].startswith("dense"):
            assert cfg.moe is None and cfg.d_ff == 256  # one expert's FLOPs: top-1's active FLOPs
        else:
            assert cfg.moe.capacity_factor == point["model.moe.capacity_factor"]
        assert config.train.seed == point.get("train.seed", 0)


def test_summarize_writes_table_and_plot(tmp_path):
    rows = []
    for router in moe_routing.ROUTERS:
        for i, cf in enumerate(moe_routing.CAPACITY_FACTORS):
            r = {"name": f"{router}_cf{cf:g}", "heldout_loss": 2.0 - 0.01 * i, "step_time_s": 0.1}
            r.update({"final_layer_1/dropped": 0.1 / (i + 1), "final_layer_3/dropped": 0.0})
            r.update({"final_layer_1/load_imbalance": 1.5, "final_layer_3/load_imbalance": 1.1})
            rows.append(r)
    rows.append({"name": "dense", "heldout_loss": 2.1, "step_time_s": 0.08})
    md = moe_routing.summarize(rows, tmp_path)
    assert md.startswith("| point |") and md.count("\n| ") == len(rows)  # one line per point
    assert "| switch_cf0.5 | 2 |" in md and "| 0.05 | 1.3 |" in md  # layer means
    assert (tmp_path / "moe_routing.png").stat().st_size > 5000


def test_cli_bad_moe_override_is_one_clear_line(tmp_path):
    cmd = [
        sys.executable, "-m", "experiments.train",
        "--config=experiments/configs/moe_routing.py:runlocal", f"--workdir={tmp_path}",
        "--config.model.moe.top_k=9",
    ]  # fmt: skip
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "error: model.moe.top_k=9 must be in [1, num_experts=4]"
    )


def test_moe_point_adds_served_and_compute_budget_evals(trained, monkeypatch):
    from experiments import points

    workdir, trainer, params, eval_loss = trained
    monkeypatch.setattr(loop, "train_from_config", lambda c, w: (trainer, params, eval_loss))
    out = points.moe_point(None, workdir)
    assert out["heldout_loss"] == eval_loss and out["step_time_s"] > 0
    for key in ("heldout_serve", "heldout_cf0.5_bpr", "heldout_cf0.5_nobpr"):
        assert 0 < out[key] < 10, key
    assert len(out["final_layer_1/tokens_per_expert"]) == 4
