"""experiments.cotrain's runs on the runlocal variant: every mode runs, the table and the plot."""

import pytest


def test_cotrain_and_slora_serve_the_shared_small_model():
    from experiments.configs import cotrain, slora
    from experiments.configs.small_lm import small_model
    from models import ModelConfig

    for variant, width, layers in (("default", 128, 4), ("runlocal", 64, 2)):
        co, sl = cotrain.get_config(variant).model, slora.get_config(variant).model
        assert (co.d_model, co.n_layers, sl.d_model, sl.n_layers) == (width, layers) * 2
        assert (co.max_seq_len, sl.max_seq_len) == (256, 128) and co.moe.num_experts == 8
        assert sl.to_dict() == small_model(variant == "runlocal", max_seq_len=128)
        for model in (co, sl):
            ModelConfig.from_dict(model.to_dict())  # a valid model config


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
