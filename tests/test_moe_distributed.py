"""An expert-parallel train step on two JAX processes equals the same step on one."""

import pytest
from test_distributed import _run  # tests/ is on sys.path under pytest

from mlx_sched.train import plots

WORKER = __file__.replace("test_moe_distributed.py", "moe_dist_worker.py")


@pytest.mark.slow
def test_two_process_expert_parallel_training_equals_one_process(tmp_path):
    """2 processes x 2 devices (mesh data=2 x expert=2) == 1 process x 4 devices."""
    _run(1, 4, tmp_path / "one", worker=WORKER)
    _run(2, 2, tmp_path / "two", worker=WORKER)
    one = plots.read_jsonl(tmp_path / "one" / "metrics.jsonl")
    two = plots.read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in one] == [(r["step"], r["split"]) for r in two]
    assert len(one) == 6
    for a, b in zip(one, two, strict=True):
        assert set(a) == set(b)
        for key, value in a.items():
            if key in ("split", "step", "lr", "tok_s", "step_time_s"):
                continue
            assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, a, b)
    train = [r for r in one if r["split"] == "train"]
    assert all(len(r["layer_1/tokens_per_expert"]) == 4 for r in train)
    assert any(r["layer_1/dropped"] > 0 for r in train)  # capacity 0.75 bites: routing matters
