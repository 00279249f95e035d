"""The Llumnix experiment (experiments/migration.py): its trace, its downtime summary and
tables on hand-made records, and each study run at the runlocal size on real engines. The
studies come from experiments.migration_studies (their cluster and trace from
experiments.migration_serving): importing the entry point would define its
absl flags a second time beside another experiment's (a collection error)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from experiments import migration_report as report
from experiments import migration_serving as serving
from experiments import migration_studies as exp
from experiments.configs import migration as configs

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config():
    return configs.get_config("runlocal")


def test_config_variants_name_known_studies():
    for variant in ("default", "runlocal"):
        c = configs.get_config(variant)
        assert set(c.studies.split(",")) == set(exp.STUDIES)
        assert c.cluster.num_instances == 4 and c.cluster.dispatch == "llumnix"
        d = c.downtime
        assert max(d.lengths) + d.max_tokens <= d.model.max_seq_len  # every length fits
    with pytest.raises(ValueError, match="unknown variant"):
        configs.get_config("huge")


def test_trace_is_bursty_heavy_tailed_and_marks_a_share_high_priority():
    c = configs.get_config("default")
    trace = serving.make_trace(c.load, c.model.vocab_size, seed=0, high_share=0.1)
    assert len(trace) == c.load.num_requests
    gaps = np.diff([r.arrival for r in trace])
    assert (gaps >= 0).all() and gaps.std() / gaps.mean() > 1.5  # Gamma with CV 3
    outs = np.array([r.max_tokens for r in trace])
    assert outs.max() > 4 * np.median(outs)  # a few long requests hold most pages
    assert all(len(r.prompt) + r.max_tokens <= c.load.max_total for r in trace)
    high = sum(r.priority == 1 for r in trace)
    assert 0.04 * len(trace) < high < 0.2 * len(trace)
    again = serving.make_trace(c.load, c.model.vocab_size, seed=0, high_share=0.1)
    assert [r.priority for r in again] == [r.priority for r in trace]  # seeded
    assert not any(r.priority for r in serving.make_trace(c.load, 256, seed=0))


def _move(length, outcome="done", downtime=0.001, seconds=0.004, nbytes=2**20, stopped=None):
    rec = {"length": length, "outcome": outcome, "stages": 2, "bytes": nbytes,
           "seconds": seconds, "downtime": downtime, "decoded_while_moving": 3}  # fmt: skip
    return rec if stopped is None else {**rec, "stopped": stopped}


def test_downtime_rows_average_done_moves_and_count_aborted_ones():
    out = {
        "migrations": [_move(64, downtime=0.001), _move(64, downtime=0.003),
                       _move(64, outcome="aborted: the destination has no 5 free pages")],
        "stop_and_copy": [_move(64, stopped=0.010), _move(64, stopped=0.020)],
    }  # fmt: skip
    row = exp.downtime_row(64, out)
    assert row["done"] == 2 and row["aborted"] == 1
    assert row["downtime_ms"] == pytest.approx(2.0)
    assert (row["downtime_min_ms"], row["downtime_max_ms"]) == pytest.approx((1.0, 3.0))
    assert row["stop_and_copy_ms"] == pytest.approx(15.0) and row["mib_copied"] == 1.0
    nothing = exp.downtime_row(128, out)
    assert nothing["done"] == 0 and np.isnan(nothing["downtime_ms"])


def test_paired_comparison_counts_seeds_where_the_other_arm_is_lower():
    row = lambda ttft, pre: {"ttft": {"p99": ttft}, "e2e": {"p99": 1.0, "p50": 1.0},
                             "tpot": {"p99": 1.0}, "preemptions": pre}  # fmt: skip
    base = {0: row(2.0, 10), 1: row(1.0, 0), 2: row(4.0, 5)}
    other = {0: row(1.0, 5), 1: row(2.0, 3), 2: row(2.0, 5), 9: row(0.1, 0)}  # 9: one arm only
    p = serving.paired(base, other)
    assert p["ttft_p99"] == {"median_ratio": 0.5, "lower": 2, "higher": 1, "seeds": 3}
    assert p["preemptions"]["median_ratio"] == pytest.approx(0.75)  # seed 1 (base 0) left out
    assert (p["preemptions"]["lower"], p["preemptions"]["higher"]) == (1, 1)
    assert p["e2e_p99"]["lower"] == p["e2e_p99"]["higher"] == 0


def _check_load_balance(res, config):
    assert [p["rate"] for p in res["points"]] == list(config.load_balance.rates)
    for point in res["points"]:
        assert set(point["pooled"]) == {"off", "on"}
        for arm in point["pooled"].values():
            assert arm["finished"] == arm["requests"] > 0
            assert {"ttft", "tpot", "e2e", "preemptions"} <= set(arm)
            assert arm["ttft"]["p99"] >= arm["ttft"]["p50"] > 0
        runs = point["runs"]
        assert len(runs) == 2 * len(config.load.seeds) and all(r["compiles"] == 0 for r in runs)
        assert sum(r["migrations"] for r in runs if r["migration"]) >= 1  # the policy moved some
        assert point["paired"]["preemptions"]["seeds"] == len(config.load.seeds)
        assert all(r["migrations"] == 0 for r in runs if not r["migration"])


def _check_downtime(res, config):
    d = config.downtime
    assert len(res["migrations"]) == len(res["stop_and_copy"]) == len(d.lengths) * d.repeats
    for rec in res["migrations"]:
        assert rec["kind"] == "migration" and rec["outcome"] == "done"
        assert rec["stages"] >= 2 and rec["bytes"] > 0 and rec["downtime"] > 0
        assert rec["tokens"] >= rec["computed_at_start"] >= rec["length"]
    for rec in res["stop_and_copy"]:
        assert rec["kind"] == "handover" and rec["outcome"] == "done" and rec["stopped"] > 0
    assert [r["length"] for r in res["by_length"]] == list(d.lengths)


def _check_priority(res):
    assert set(res["pooled"]) == {"no_headroom", "headroom"}
    for arm in res["pooled"].values():
        assert arm["high"]["requests"] > 0 and arm["normal"]["requests"] > 0
        assert arm["high"]["finished"] == arm["high"]["requests"]
    assert {r["arm"] for r in res["runs"]} == {"no_headroom", "headroom"}
    assert sum(r["migrations"] for r in res["runs"]) >= 1  # migration is on in both arms
    assert set(res["paired_high"]) == set(serving.PAIRED)


@pytest.mark.slow  # 3 clusters of 4 engines, compiled on 4 devices (~40 s on a cold cache)
def test_load_balance_study_migrates_and_plots(config, tmp_path):
    res = exp.load_balance(config, tmp_path)
    _check_load_balance(res, config)
    text = report.tables({"load_balance": res})
    assert text.count("| on |") == len(config.load_balance.rates)
    assert (tmp_path / "migration_latency.png").stat().st_size > 1000


def test_downtime_study_records_every_move(config, tmp_path):
    res = exp.downtime(config, tmp_path)
    _check_downtime(res, config)
    assert "| 96 |" in report.tables({"downtime": res})
    assert (tmp_path / "migration_downtime.png").stat().st_size > 1000


def test_priority_study_reports_both_classes_and_arms(config, tmp_path):
    res = exp.priority(config, tmp_path)
    _check_priority(res)
    assert "| headroom | high |" in report.tables({"priority": res})
    assert (tmp_path / "migration_priority.png").stat().st_size > 1000


@pytest.mark.slow  # the entry point in a subprocess: sets its own 8 devices
def test_entry_point_writes_the_json(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-m", "experiments.migration",
         "--config=experiments/configs/migration.py:runlocal", f"--workdir={tmp_path}",
         "--config.studies=downtime"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[downtime 2/2] stop-and-copy L=96: done" in out.stdout
    results = json.loads((tmp_path / "migration.json").read_text())
    assert {"config", "devices", "downtime"} <= set(results) and "8 x" in results["devices"]
    assert "load_balance" not in results
    _check_downtime(results["downtime"], configs.get_config("runlocal"))


def test_load_balance_in_the_simulator(config, tmp_path):
    """The load study over simulated instances: both arms serve every request of every
    trace; migration on migrates, off never does."""
    out = exp.load_balance_sim(config, tmp_path)
    for arms in out["rates"].values():
        for arm in ("off", "on"):
            for row in arms[arm]["per_seed"].values():
                assert row["finished"] == row["requests"] == config.load.num_requests
        assert all(r["migrations"] == 0 for r in arms["off"]["per_seed"].values())
        assert sum(r["migrations"] for r in arms["on"]["per_seed"].values()) > 0
        assert set(arms["paired"]) and all(v["seeds"] == 2 for v in arms["paired"].values())
