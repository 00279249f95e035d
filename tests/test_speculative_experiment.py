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
