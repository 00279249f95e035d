"""experiments.cotrain's runs on the runlocal variant: every mode runs, the table and the plot."""

import pytest


@pytest.mark.slow  # pre-trains a tiny MoE, then four ~8 s runs
def test_cotrain_experiment_runlocal(tmp_path):
    from experiments import cotrain_runs
    from experiments.configs.cotrain import get_config

    config = get_config("runlocal")
    lines = []
    results = cotrain_runs.run_all(config, tmp_path, progress=lines.append)
    runs = results["runs"]
    assert set(runs) == {"serve_only", "strict", "deferral_0.5", "train_only"}
    n = results["requests"]
    for name in ("serve_only", "strict", "deferral_0.5"):
        assert runs[name]["serving"]["finished"] == n
        assert runs[name]["engine_compiles_after_warmup"] == 0
    assert runs["serve_only"]["train_steps"] == 0
    assert runs["train_only"]["serving"] == {} and runs["train_only"]["train_steps"] > 0
    co = runs["deferral_0.5"]
    assert co["train_steps"] > 0 and co["updates"] > 0
    assert len(co["heldout"]) == co["updates"] + 1  # the initial routers, then each update
    assert all("load_imbalance" in p for p in co["serve_log"])
    table = cotrain_runs.table(results)
    assert table.count("\n") == len(runs) + 1 and len(lines) == len(runs)
    (path,) = cotrain_runs.plots(results, tmp_path)
    assert path.stat().st_size > 0
    with pytest.raises(ValueError, match="unknown run"):
        config.unlock()
        config.runs = "bogus"
        cotrain_runs.run_all(config, tmp_path)
