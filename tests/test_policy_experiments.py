"""Each policy experiment's sweep runs end to end (on the simulator, runlocal sizes) and its
summary compares the effect with the paper's claim, with a plot."""

import json

import pytest

from experiments import points, sweep

EXPERIMENTS = {
    "fairness": "fairness.png",
    "chunked_prefill": "chunked_prefill.png",
    "mlfq": "mlfq.png",
    "slice_level": "slice_level.png",
    "priority": "priority.png",
}


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_policy_experiment_sweep_summarizes_with_plot(name, tmp_path):
    module, variant = sweep.load_module(f"experiments/configs/{name}.py:runlocal")
    rows = []
    for point in sweep.points_of(module, variant):
        config = sweep.point_config(module, variant, point)
        with config.ignore_type():
            config.device = "sim"
        pdir = tmp_path / point["name"]
        pdir.mkdir()
        row = {"name": point["name"], **points.serve_point(config, pdir)}
        assert row["finished"] == row["requests"] > 0, point["name"]
        assert row["compiles_after_warmup"] == 0
        assert json.loads((pdir / "serving.json").read_text())["finished"] == row["finished"]
        rows.append(row)
    md = module.summarize(rows, tmp_path)
    assert md.startswith("# ") and "| point |" in md
    assert all(f"| {r['name']} |" in md for r in rows)
    assert "Paper" in md or "Expected" in md  # the claim it is compared against
    assert (tmp_path / EXPERIMENTS[name]).stat().st_size > 0
