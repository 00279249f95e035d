"""The DistServe experiment: goodput read off served rates, its config, and the runlocal
variant end to end (real engines, the simulator, the speed study). The experiment's module
defines absl flags: it runs in a subprocess, never imported here."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from experiments.configs import disaggregation as cfg
from mlx_sched.cluster.placement import SLO, served_goodput

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_served_goodput_is_the_highest_attaining_rate():
    ok = {"status": "finished", "ttft": 0.1, "tpot": 0.01}
    late = {"status": "finished", "ttft": 5.0, "tpot": 0.01}
    slo = SLO(1.0, 0.1)
    per_rate = [[ok] * 10, [ok] * 9 + [late], [ok] * 5 + [late] * 5]
    assert served_goodput([1.0, 2.0, 4.0], per_rate, slo) == 2.0
    assert served_goodput([1.0], [[late]], slo) == 0.0


def test_config_variants():
    c = cfg.get_config()
    assert set(c.studies) == {"real", "sim", "speed"}
    assert all(s > 0 for s in c.slo_scales)
    with pytest.raises(ValueError, match="unknown variant"):
        cfg.get_config("huge")


@pytest.mark.slow
def test_runlocal_end_to_end(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [
        sys.executable,
        "-m",
        "experiments.disaggregation",
        "--config=experiments/configs/disaggregation.py:runlocal",
        f"--workdir={tmp_path}",
    ]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=1800)
    out = json.loads((tmp_path / "disaggregation.json").read_text())
    assert (tmp_path / "disaggregation.png").stat().st_size > 0
    real = out["real"]
    assert set(real["runs"]) == {"colocated 2x1", "prefill 1x1 + decode 1x1"}
    for rows in real["runs"].values():
        for row in rows:
            assert row["compiles_after_warmup"] == [0, 0]
            assert all(m["status"] == "finished" for m in row["real_metrics"])
    assert len(real["goodput_per_device"]) == len(cfg.get_config("runlocal").slo_scales)
    assert real["search"]["best"] in {c["layout"] for c in real["search"]["candidates"]}
    for row in out["sim"]["by_scale"]:
        best = max(c["goodput_per_device"] for c in row["candidates"])
        assert max(row["colocated_per_device"], row["disaggregated_per_device"]) == best
    assert out["speed"]["batches"] > 0 and out["speed"]["requests"] == 200
