"""The sweep runner: points run in subprocesses, finished points are skipped, one table."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from experiments import sweep
from experiments.common import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = textwrap.dedent(
    """
    from experiments.configs import lm

    def get_config(arg="default"):
        c = lm.get_config("runlocal")
        c.train.update(steps=4, log_every=2, eval_every=4, ckpt_every=4, warmup_steps=1)
        return c

    def get_sweep(arg="default"):
        return [{"name": "a", "train.lr": 1e-3}, {"name": "b", "train.lr": 1e-2}]
    """
)


def _sweep(cfg, workdir, *extra):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.sweep",
            f"--config={cfg}",
            f"--workdir={workdir}",
            *extra,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow  # a sweep of subprocesses
def test_sweep_runs_points_and_skips_finished_ones(tmp_path):
    cfg = tmp_path / "exp.py"
    cfg.write_text(CONFIG)
    out = _sweep(cfg, tmp_path / "w", "--only=a", "--config.train.steps=2")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "w" / "a" / "result.json").read_text())
    assert result["train.lr"] == 1e-3 and result["heldout_loss"] > 0
    steps = [json.loads(x)["step"] for x in (tmp_path / "w" / "a" / "metrics.jsonl").open()]
    assert max(steps) == 2  # the command line's override reached the point's process
    assert not (tmp_path / "w" / "b").exists()
    mtime = (tmp_path / "w" / "a" / "result.json").stat().st_mtime
    out = _sweep(cfg, tmp_path / "w")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "a: done already, skipping" in out.stderr
    assert (tmp_path / "w" / "a" / "result.json").stat().st_mtime == mtime
    table = (tmp_path / "w" / "results.md").read_text()
    assert table.count("\n| a |") == 1 and table.count("\n| b |") == 1


def test_bad_point_key_is_a_clear_error(tmp_path):
    cfg = tmp_path / "exp.py"
    cfg.write_text(CONFIG.replace('"train.lr": 1e-2', '"train.lrr": 1e-2'))
    module, variant = sweep.load_module(str(cfg))
    with pytest.raises(ConfigError, match="unknown key 'train.lrr'"):
        sweep.point_config(module, variant, module.get_sweep()[1])
    with pytest.raises(ConfigError, match="does not exist"):
        sweep.load_module(str(tmp_path / "missing.py"))


def test_markdown_table():
    table = sweep.markdown_table([{"x": 1, "y": 0.123456}, {"x": 2}], ["x", "y"])
    assert table.splitlines() == ["| x | y |", "|---|---|", "| 1 | 0.1235 |", "| 2 |  |"]


def test_command_line_overrides_apply_to_every_point_and_points_win(tmp_path):
    cfg = tmp_path / "exp.py"
    cfg.write_text(CONFIG)
    module, variant = sweep.load_module(str(cfg))
    a, b = module.get_sweep()
    config = sweep.point_config(module, variant, a, {"train.steps": 10, "train.lr": 0.5})
    assert config.train.steps == 10 and config.train.lr == 1e-3  # the point's lr wins
    with pytest.raises(ConfigError, match="unknown key 'train.stepz'"):
        sweep.point_config(module, variant, b, {"train.stepz": 1})


def test_override_args_are_passed_to_points_as_given():
    argv = ["--config=x.py", "--config.a.b=1", "--only=p", "--config.c", "2", "--noconfig.d"]
    assert sweep.override_args(argv) == ["--config.a.b=1", "--config.c", "2", "--noconfig.d"]


def test_docstring_only_example_names_real_points():
    from experiments.configs import moe_routing

    names = {p["name"] for p in moe_routing.get_sweep("default")}
    example = sweep.__doc__.split("--only=")[1].split("]")[0].split(",")
    assert example == ["switch_cf1", "dense"] and set(example) <= names
