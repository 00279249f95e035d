"""The main job end to end (runlocal variant): trains, samples, says where results went."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
