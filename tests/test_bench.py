"""The benchmark scripts run end to end on their smallest settings (they measure speed; this
only checks that they work and report what they promise)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_bench_serving_reports_slice_comparison(tmp_path):
    out = _run(
        "experiments.bench_serving",
        "--config=experiments/configs/serve.py:runlocal",
        f"--workdir={tmp_path}",
        "--slice_lens=1,4",
    )
    assert "compilations after warm-up: 0" in out
    assert "decode tok/s S=4 / S=1:" in out
    data = json.loads((tmp_path / "bench_serving_runlocal.json").read_text())
    assert set(data) == {"1", "4"} and data["4"]["finished"] == data["4"]["requests"]
    # named by variant, so another variant in the same workdir does not overwrite them
    assert (tmp_path / "serving_runlocal_S4_timeline.png").exists()
    assert not list(tmp_path.glob("serving_S*"))


@pytest.mark.slow
def test_bench_llama_reports_labelled_throughput_and_startup(tmp_path):
    common = (f"--workdir={tmp_path}", "--dtypes=float32", "--cores=0")
    out = _run("experiments.bench_llama", *common, "--traces=fixed", "--runs=1")
    assert "output tok/s | total tok/s" in out and "| fixed | float32 | mlx_sched |" in out
    (row,) = json.loads((tmp_path / "bench_llama_default.json").read_text())
    ours = row["mlx_sched"]
    assert ours["compiles_after_warmup"] == 0
    assert ours["total_tok_s_best"] == pytest.approx(2 * ours["output_tok_s_best"])  # 128 -> 128
    out = _run("experiments.bench_llama", *common, "--startup")
    first, second = json.loads((tmp_path / "startup_default.json").read_text())
    assert first["cache_misses"] > 0 and first["cache_hits"] == 0  # a fresh cache
    assert second["cache_misses"] == 0 and second["cache_hits"] == first["cache_misses"]
    assert "| float32 | second |" in out


@pytest.mark.slow
def test_profile_engine_reports_decode_and_mixed_steps():
    out = _run("experiments.profile_engine", "--dtypes=bfloat16", "--reps=1", "--batch=16")
    assert "| bfloat16 |" in out and "mixed step:" in out
    assert "packed matmuls:" in out


@pytest.mark.slow
def test_bench_speculative_reports_speculation_against_off(tmp_path):
    out = _run(
        "experiments.bench_speculative", f"--workdir={tmp_path}", "--batches=1",
        "--gammas=2", "--drafters=lookup,small", "--output=8", "--runs=1",
        "--target=llama44m", "--tree=1x2", "--adaptive_gamma=2", "--idle",
    )  # fmt: skip
    for row in ("| off | off | 1 |", "| lookup | chain 2 | 1 |",
                "| small | tree 1x2 | 1 |",
                "| small | adaptive <=2 | 1 |"):  # fmt: skip
        assert row in out
    assert "adaptive vs off, worst batch" in out
    rows = json.loads((tmp_path / "results_float32.json").read_text())
    assert {r["drafter"] for r in rows} == {"off", "lookup", "small"}
    assert all(r["compiles_after_warmup"] == 0 for r in rows)
    assert all(r["proposed"] > 0 for r in rows if r["drafter"] != "off" and not r.get("adaptive"))
    assert [r["proposed"] for r in rows if r.get("idle")] == [0, 0]  # lookup and small
    assert all(r["off_tok_s"] > 0 for r in rows if r["drafter"] != "off")  # interleaved runs
    assert "idle (speculation configured, never drafting) vs off" in out


@pytest.mark.slow
def test_bench_train_reports_fraction_of_peak(tmp_path):
    out = _run(
        "experiments.bench_train",
        "--steps=1",
        "--batch_size=2",
        "--seq_len=32",
        f"--out={tmp_path / 'r.json'}",
    )
    assert "fraction of peak" in out
    assert "bf16/f32 train speed (default, same process):" in out
    r = json.loads((tmp_path / "r.json").read_text())["default"]
    for dtype in ("float32", "bfloat16"):
        assert r[dtype]["fraction_of_peak"] > 0 and r[dtype]["step_gflop"] > 0
    assert r["bf16_over_f32"]["best"] > 0


@pytest.mark.parametrize(
    "variant", ["default", "online", "decode", "decode_small", "llama44m", "runlocal"]
)
def test_serve_config_variants_build_valid_engine_configs(variant):
    from experiments.configs import serve
    from mlx_sched.serve.config import ServeConfig
    from models import ModelConfig

    c = serve.get_config(variant)
    ServeConfig.from_dict(c.serve.to_dict())  # raises on an invalid engine config
    ModelConfig.from_dict(c.model.to_dict())
    if variant == "decode_small":
        assert c.model.d_model < serve.get_config("decode").model.d_model


def test_serve_config_rejects_unknown_variant():
    from experiments.configs import serve

    with pytest.raises(ValueError, match="unknown variant"):
        serve.get_config("nope")


def test_benchmarks_never_write_into_docs():
    """docs/ holds the README's figures; a benchmark run writes under runs/ (or --workdir)."""
    from experiments import bench_attention

    for flag in (bench_attention._PLOT, bench_attention._OUT):
        assert flag.default.startswith("runs/") and "docs" not in flag.default


def test_bench_simulator_reports_batches_steps_and_requests(tmp_path):
    out = _run(
        "experiments.bench_simulator", "--requests=100", "--slice_lens=1,8", "--runs=2",
        f"--workdir={tmp_path}",
    )  # fmt: skip
    assert "| slice_len | steps | batches | mean batch | us / batch |" in out
    assert "slice_len=8:" in out and "Vidur's speed" in out and "requests/s (median run)" in out
    data = json.loads((tmp_path / "bench_simulator.json").read_text())
    assert set(data) == {"1", "8"}
    one, eight = data["1"], data["8"]
    assert one["requests"] == eight["requests"] == 100
    assert one["steps"] == one["batches"]  # S = 1: a batch per step
    assert eight["steps"] < eight["batches"]  # slices: several batches per step
    assert one["output_tokens"] == eight["output_tokens"]


@pytest.mark.slow
def test_bench_simulator_times_a_baseline_checkout_on_the_same_trace():
    out = _run(
        "experiments.bench_simulator", "--requests=50", "--slice_lens=4", "--runs=1",
        f"--baseline={ROOT}",
    )  # fmt: skip
    assert "slice_len=4: baseline" in out
    assert "the same simulation (steps, simulated seconds, tokens): yes" in out


def test_bench_cluster_sim_reports_its_budgets(tmp_path):
    out = _run(
        "experiments.bench_cluster_sim", "--num_requests=120", "--instances=3", "--repeats=2",
        f"--workdir={tmp_path}",
    )  # fmt: skip
    assert "| requests | instances | steps | batches | wall s | us / batch |" in out
    assert "| 120 | 3 |" in out
    assert "1,000,000 requests over 3 instances:" in out and "projected from 120" in out
    assert "Vidur's speed" in out and "target >= 10x:" in out
    row = json.loads((tmp_path / "bench_cluster_sim.json").read_text())
    assert row["requests"] == 120 and row["instances"] == 3
    assert row["batches"] >= row["steps"] > 0 and row["events"] > row["steps"]
    assert len(row["wall_s"]) == 2 and row["wall_s"][0] <= row["wall_s"][1]
    assert row["peak_rss_gb"] > 0 and row["seconds_for_1m"] > 0


def test_bench_cluster_sim_refuses_bad_settings():
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-m", "experiments.bench_cluster_sim", "--num_requests=0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2 and "must be > 0" in out.stderr


def test_bench_speculative_verdicts_with_only_the_adaptive_and_idle_modes():
    from experiments.spec_lab import bench_verdicts as verdicts

    ref = {1: {"output_tok_s": 100.0}}
    rows = [
        {"drafter": "off", "mode": "off", "batch": 1, "output_tok_s": 100.0, "acceptance": None},
        {"drafter": "small", "mode": "adaptive <=8", "batch": 1, "output_tok_s": 90.0,
         "acceptance": 0.2, "adaptive": True},
        {"drafter": "small", "mode": "idle", "batch": 1, "output_tok_s": 97.0,
         "acceptance": None, "adaptive": True, "idle": True},
        # timed interleaved with off's runs: its ratio is to those (60), not to the off row
        {"drafter": "small", "mode": "chain 2", "batch": 1, "output_tok_s": 120.0,
         "acceptance": 0.5, "off_tok_s": 60.0},
        # more tok/s, but against a faster off in its own runs: the smaller ratio
        {"drafter": "small", "mode": "chain 4", "batch": 1, "output_tok_s": 130.0,
         "acceptance": 0.5, "off_tok_s": 100.0},
    ]  # fmt: skip
    lines = verdicts(rows, ref)
    assert lines[0].startswith("small: batch 1: best fixed mode chain 2 2.00x off")
    # the idle row is reported on its own, not as AdaSpec's worst batch
    assert "small: adaptive vs off, worst batch: 0.90x (goal >= 1.00x)" in lines
    assert "  batch 1: adaptive 90 tok/s, best fixed (chain 4) 130, off 100" in lines
    assert "small: idle (speculation configured, never drafting) vs off: batch 1 0.97x" in lines


@pytest.mark.slow
def test_bench_transfer_compares_packed_and_per_array_bundles():
    out = _run("experiments.bench_transfer", "--batches=1", "--output=4", "--runs=1")
    assert "| 1 |" in out and "compilations after warm-up: 0" in out
