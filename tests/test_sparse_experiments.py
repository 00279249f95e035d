"""The sparse-attention benchmark's analysis and the training experiment's config and summary."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import bench_attention as bench
from experiments import sweep
from experiments.configs import sparse_attention as exp
from models import ModelConfig
from models.patterns import DenseCausal, pattern_for_layer
from models.sparse_attention import Fixed, Strided

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows():
    """Synthetic measurements: dense ~ n^2, sparse ~ 40 n^1.5 (crossover at n = 1600)."""
    rows = []
    for n in (256, 1024, 4096):
        rows.append({"n": n, "form": "dense", "train_ms_median": n**2 / 1e3, "mem_mib": n**2})
        rows.append(
            {"n": n, "form": "strided", "train_ms_median": 40 * n**1.5 / 1e3, "mem_mib": n**1.5}
        )
    for r in rows:
        r.update(train_ms_best=r["train_ms_median"], gflop=1.0, l=bench.stride_for(r["n"]))
    return rows


def test_stride_is_about_sqrt_n():
    assert [bench.stride_for(n) for n in (512, 1024, 2048, 16384)] == [32, 32, 64, 128]


def test_slopes_and_crossover_of_known_power_laws(tmp_path):
    rows = _rows()
    dense = [r for r in rows if r["form"] == "dense"]
    sparse = [r for r in rows if r["form"] == "strided"]
    assert bench.slope(dense, "train_ms_median") == pytest.approx(2.0)
    assert bench.slope(sparse, "mem_mib", min_n=1024) == pytest.approx(1.5)
    assert bench.crossover(dense, sparse, "train_ms_median") == pytest.approx(1600, rel=1e-6)
    assert bench.crossover(dense, sparse, "mem_mib") == 256  # smaller from the start
    slower = [{**r, "train_ms_median": 1e9} for r in sparse]
    assert bench.crossover(dense, slower, "train_ms_median") is None
    rows[1]["skipped"] = "needs 9 GiB"
    text = bench.table(rows, ["dense", "strided"])
    assert text.splitlines()[2].startswith("| 256 | 16 | 65.5 (65.5) | does not fit |")
    bench.plot(_rows(), ["dense", "strided"], str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_measure_runs_every_form_and_skips_what_does_not_fit():
    rows = bench.measure(64, ["dense", "strided", "fixed", "masked"], repeats=1)
    assert set(rows) == {"dense", "strided", "fixed", "masked"}
    for r in rows.values():
        assert r["train_ms_best"] > 0 and r["mem_mib"] > 0 and r["gflop"] > 0
    tiny = bench.measure(64, ["dense"], repeats=1, max_gib=1e-9)
    assert "skipped" in tiny["dense"] and "train_ms_best" not in tiny["dense"]


@pytest.mark.parametrize("variant", ["default", "runlocal"])
def test_experiment_points_build_the_right_models(variant):
    module, _ = sweep.load_module(os.path.join(ROOT, "experiments/configs/sparse_attention.py"))
    points = sweep.points_of(module, variant)
    names = ["dense", "strided", "fixed"]
    if variant == "default":
        names += ["dense_seed1", "strided_seed1", "fixed_seed1"]
    assert [p["name"] for p in points] == names
    kinds = {"dense": DenseCausal, "strided": Strided, "fixed": Fixed}
    for p in points:
        config = sweep.point_config(module, variant, p)
        cfg = ModelConfig.from_dict(config["model"])
        kind = kinds[p["name"].split("_")[0]]
        assert all(isinstance(pattern_for_layer(cfg, i), kind) for i in range(2))
        assert config.train.seed == (1 if "seed1" in p["name"] else 0)
    with pytest.raises(ValueError, match="unknown variant"):
        exp.get_config("huge")


def test_summarize_writes_a_table_and_a_plot(tmp_path):
    rows = []
    for i, name in enumerate(["dense", "strided", "fixed", "fixed_seed1"]):
        (tmp_path / name).mkdir()
        metrics = [
            {"step": 10, "split": "train", "loss": 3.0 - i / 10},
            {"step": 20, "split": "train", "loss": 2.5 - i / 10},
            {"step": 20, "split": "eval", "ce": 2.6 - i / 10},
        ]
        (tmp_path / name / "metrics.jsonl").write_text(
            "".join(json.dumps(m) + "\n" for m in metrics)
        )
        pattern = name.split("_")[0]
        rows.append(
            {
                "name": name,
                "model.attention.pattern": pattern,
                "heldout_loss": 2.6 - i / 10,
                "step_time_s": 2.0 / (i + 1),
            }
        )
    rows[-1]["train.seed"] = 1
    text = exp.summarize(rows, tmp_path)
    assert "| strided | strided | 0 | 2.5000 | 3.607 | 1.00 |" in text
    assert "| fixed_seed1 | fixed | 1 | 2.3000 |" in text
    assert "| strided | 1 | 2.5000 (0.0000) | 1.00 | 0.50 |" in text
    assert "| fixed | 2 | 2.3500 (0.1000) | 0.58 | 0.29 |" in text
    assert (tmp_path / "sparse_attention.png").stat().st_size > 1000


@pytest.mark.slow
def test_runlocal_sweep_trains_all_three_patterns(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.sweep",
            "--config=experiments/configs/sparse_attention.py:runlocal",
            f"--workdir={tmp_path}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    results = [json.loads((tmp_path / n / "result.json").read_text()) for n in exp.PATTERNS]
    assert all(np.isfinite(r["heldout_loss"]) and r["heldout_loss"] < np.log(256) for r in results)
    assert "| fixed |" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_bench_command_prints_table_slopes_and_writes_plot(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.bench_attention",
            "--lengths=64,128",
            "--repeats=1",
            f"--plot={tmp_path / 'b.png'}",
            f"--out={tmp_path / 'b.json'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| 128 | 16 |" in out.stdout and "crossover strided vs dense" in out.stdout
    assert len(json.loads((tmp_path / "b.json").read_text())) == 8
    assert (tmp_path / "b.png").stat().st_size > 1000
