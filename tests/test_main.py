"""The main job end to end (runlocal variant): trains, samples, says where results went."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # the two-engine main job in a subprocess
def test_main_job_runs_and_reports(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.main",
            "--config=experiments/configs/main.py:runlocal",
            f"--workdir={tmp_path}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "== samples" in out.stdout and "held-out loss" in out.stdout
    assert "compilations after warm-up: 0" in out.stdout
    assert "router layer_1" in out.stdout  # the main job's model is a MoE
    assert f"results in {tmp_path}" in out.stdout
    for name in (
        "metrics.jsonl",
        "loss.png",
        "samples.txt",
        "serving.json",
        "serving_timeline.png",
    ):
        assert (tmp_path / name).stat().st_size > 0
    assert len((tmp_path / "samples.txt").read_text().splitlines()) >= 3


def test_router_summary_reads_the_last_training_step(tmp_path):
    from mlx_sched.train.plots import router_summary

    path = tmp_path / "metrics.jsonl"
    assert router_summary(path) == []  # no metrics yet
    path.write_text(
        '{"step": 1, "split": "train", "layer_1/dropped": 0.5}\n'
        '{"step": 2, "split": "train", "ce": 2.0, "layer_1/dropped": 0.25, '
        '"layer_1/load_imbalance": 1.5, "layer_1/router_entropy": 1.2, '
        '"layer_1/tokens_per_expert": [3.0, 1.0]}\n'
        '{"step": 2, "split": "eval", "ce": 2.1}\n'
    )
    (line,) = router_summary(path)
    assert line.startswith("router layer_1 (step 2): dropped 25.0%, load max/mean 1.50")
    assert "tokens per expert [3, 1]" in line
    path.write_text('{"step": 2, "split": "train", "ce": 2.0}\n')
    assert router_summary(path) == []  # dense model
