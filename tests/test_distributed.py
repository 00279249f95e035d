"""Several JAX processes on 127.0.0.1 standing in for a multi-host pod."""

import os
import socket
import subprocess
import sys

import pytest

from mlx_sched.train import plots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "dist_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(nproc: int, ndev: int, workdir, worker=WORKER) -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": ROOT}
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(i), str(nproc), str(port), str(ndev), str(workdir)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(nproc)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]


@pytest.mark.slow
def test_two_process_training_equals_one_process(tmp_path):
    """2 processes x 2 devices (mesh data=2 x tensor=2) == 1 process x 4 devices."""
    _run(1, 4, tmp_path / "one")
    _run(2, 2, tmp_path / "two")
    one = plots.read_jsonl(tmp_path / "one" / "metrics.jsonl")
    two = plots.read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in one] == [(r["step"], r["split"]) for r in two]
    assert len(one) == 6
    for a, b in zip(one, two, strict=True):
        key = "loss" if a["split"] == "train" else "ce"
        assert b[key] == pytest.approx(a[key], rel=1e-5), (a, b)
    # both processes took part in the checkpoint
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["2", "4"]
