"""The speculative-decoding experiment: its formulas, its summary's verdicts and plots, and the
runlocal sweep end to end (tiny models trained on the spot)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from experiments.configs import speculative as exp

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_leviathan_formulas():
    assert exp.expected_tokens(0.0, 4) == 1.0
    assert exp.expected_tokens(1.0, 4) == 5.0
    assert exp.expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert exp.predicted_speedup(0.5, 2, 0.25) == pytest.approx(1.75 / 1.5)
    pts = [(g, exp.expected_tokens(0.8, g)) for g in (1, 2, 4, 8)]
    assert exp.fit_alpha(pts) == pytest.approx(0.8, abs=1e-3)


def test_sweep_has_every_claim_point():
    names = {p["name"] for p in exp.get_sweep()}
    assert {"off_b1", "accept_small_g1", "accept_medium_g8", "tree_medium_3x2", "lookup_g4",
            "load32_adaptive", "load4_off"} <= names  # fmt: skip
    with pytest.raises(ValueError, match="unknown variant"):
        exp.get_config("huge")


def _row(name, **kw):
    base = dict(name=name, drafter="off", gamma=0, tree_width=1, rate=0.0, output_tok_s=100.0,
                proposed=0, accepted=0, acceptance=None, tokens_per_verify=None, draft_s=0.0,
                decode_iter_s=0.01)  # fmt: skip
    return {**base, **kw}


def test_summary_checks_the_claims_and_draws_the_plots(tmp_path):
    rows = [_row("off_b1")]
    for g in (1, 2, 4, 6):
        rows.append(_row(f"accept_medium_g{g}", drafter="medium", gamma=g, proposed=10 * g,
                         accepted=7 * g, acceptance=0.7,
                         tokens_per_verify=exp.expected_tokens(0.7, g),
                         draft_s=0.001 * 10 * g, output_tok_s=100 + 10 * g))  # fmt: skip
    rows.append(_row("tree_medium_3x2", drafter="medium", gamma=3, tree_width=2,
                     tokens_per_verify=9.0, acceptance=0.5))  # fmt: skip
    for mode, good in (("off", 50.0), ("g2", 80.0), ("g4", 90.0), ("adaptive", 95.0)):
        rows.append(_row(f"load4_{mode}", rate=4.0, goodput_tok_s=good, slo_attainment=0.9,
                         tpot_p90=0.02, ttft_p90=0.1, verify_share=0.5))  # fmt: skip
    text = exp.summarize(rows, tmp_path)
    assert (
        "medium draft: acceptance a = 0.70 (fitted to tokens per verify), cost ratio c = 0.10"
        in text
    )
    assert "best tree tree_medium_3x2 9.00 tokens per verify: reproduces" in text
    assert "AdaSpec at least as good (within 5%): yes" in text
    for png in ("speculative_acceptance.png", "speculative_speedup.png", "speculative_load.png"):
        assert (tmp_path / png).stat().st_size > 1000


@pytest.mark.slow
def test_runlocal_sweep_trains_the_models_and_measures_every_kind_of_point(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-m", "experiments.sweep",
         "--config=experiments/configs/speculative.py:runlocal", f"--workdir={tmp_path / 'w'}",
         f"--config.models_dir={tmp_path / 'models'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("target", "draft_small"):
        assert (tmp_path / "models" / name / "checkpoints").is_dir()
    rows = [
        json.loads(line) for line in (tmp_path / "w" / "results.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 5 and all(r["compiles_after_warmup"] == 0 for r in rows)
    by = {r["name"]: r for r in rows}
    assert by["accept_small_g2"]["proposed"] > 0 and by["lookup_g2"]["proposed"] > 0
    assert 0 <= by["load8_adaptive"]["slo_attainment"] <= 1
    assert "Speculative decoding" in (tmp_path / "w" / "results.md").read_text()


@pytest.mark.slow
def test_the_distilled_draft_trains_on_the_targets_greedy_continuations(tmp_path):
    from experiments import spec_lab
    from mlx_sched.serve.config import ServeConfig
    from mlx_sched.serve.engine import Engine
    from mlx_sched.serve.request import SamplingParams
    from mlx_sched.train.data import load_corpus

    run = spec_lab.ensure_model(tmp_path, "draft_distilled", tiny=True)
    assert (run / "checkpoints" / str(spec_lab.TINY["draft_distilled"][-1])).is_dir()
    docs = sorted((tmp_path / "distill_data" / "docs").glob("*.txt"))
    n, prompt_len, out_len = spec_lab.DISTILL[True]
    assert 0 < len(docs) <= n
    # each document: a prompt of the training split, then the target's greedy continuation
    prompts = spec_lab.line_slices(load_corpus().train, n, prompt_len, seed=1)
    target = spec_lab.load(tmp_path / "target", "float32")
    engine = Engine(target, ServeConfig(num_pages=256, max_seqs=4, max_context=64))
    chosen = [prompts[int(d.stem)] for d in docs]
    outs = engine.generate(chosen, SamplingParams(max_tokens=out_len))
    for doc, prompt, res in zip(docs, chosen, outs, strict=True):
        assert doc.read_bytes() == bytes(t for t in prompt + res.outputs[0] if t < 256)
    # made once: a second call reuses the text and the trained draft
    stamp = docs[0].stat().st_mtime_ns
    assert spec_lab.ensure_model(tmp_path, "draft_distilled", tiny=True) == run
    assert spec_lab.distill_data(tmp_path, tiny=True) == docs[0].parent
    assert docs[0].stat().st_mtime_ns == stamp
