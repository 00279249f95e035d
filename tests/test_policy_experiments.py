"""Each policy experiment's sweep runs end to end (on the simulator, runlocal sizes) and its
summary compares the effect with the paper's claim, with a plot."""

import json
import types

import pytest

from experiments import points, sweep

EXPERIMENTS = {
    "fairness": "fairness.png",
    "chunked_prefill": "chunked_prefill.png",
    "mlfq": "mlfq.png",
    "slice_level": "slice_level.png",
    "priority": "priority.png",
}


@pytest.mark.slow  # a sweep per experiment (the verdict logic has fast tests below)
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
    if name in ("fairness", "mlfq", "priority"):  # verdicts that need overload say if it was
        assert "offered" in md and "served" in md
    assert (tmp_path / EXPERIMENTS[name]).stat().st_size > 0


# ---------------------------------------------------------------------------
# Verdicts come from the run's own numbers, and say when the regime was not reached
# ---------------------------------------------------------------------------


def _fairness_rows(fcfs_diff, vtc_diff, share, offered=4.5, served=2.6):
    common = {"max_request_cost": 768, "offered_req_s": offered, "served_req_s": served}
    fcfs = {"name": "fcfs", "max_service_diff": fcfs_diff, "backlogged_share": share, **common}
    vtc = {"name": "vtc", "max_service_diff": vtc_diff, "backlogged_share": share, **common}
    return fcfs, {**vtc, "capacity_req_s": 2.25}


def test_fairness_verdict_reproduces_when_overloaded_and_the_gaps_show_it():
    from experiments.configs import fairness

    text = fairness.verdict(*_fairness_rows(34_192, 740, share=0.9))
    assert "The effect reproduces" in text and "NOT" not in text
    assert "34,192 tokens (44.5 requests of cost 768)" in text and "90% of the FCFS run" in text


def test_fairness_verdict_says_when_the_run_was_not_overloaded():
    from experiments.configs import fairness

    # the run on another machine: FCFS's gap stayed at 1,288 tokens, queues did not build
    text = fairness.verdict(*_fairness_rows(1_288, 700, share=0.1, offered=4.5, served=4.4))
    assert "NOT overloaded" in text and "regime the paper needs was not reached" in text
    assert "reproduces" in text and "neither reproduces nor refutes" in text
    assert "The effect reproduces" not in text


def test_fairness_verdict_does_not_reproduce_when_vtc_is_not_bounded():
    from experiments.configs import fairness

    text = fairness.verdict(*_fairness_rows(30_000, 9_000, share=0.9))
    assert "does NOT reproduce" in text and "VTC's gap exceeded 2 requests' cost" in text


def test_load_note_judges_overload_from_offered_and_served():
    from experiments.configs import policies_common as pc

    over, text = pc.load_note({"name": "fcfs", "offered_req_s": 15.0, "served_req_s": 7.5})
    assert over and "offered 15.00 req/s and served 7.50 req/s" in text
    over, _ = pc.load_note({"name": "fcfs", "offered_req_s": 15.0, "served_req_s": 14.6})
    assert not over


def test_mlfq_and_priority_verdicts_depend_on_the_measured_load():
    from experiments.configs import mlfq, priority

    load = {"offered_req_s": 15.0, "served_req_s": 7.0}
    f = {"name": "fcfs", "jct_mean": 14.7, "jct_p99": 32.4, **load}
    m = {"name": "mlfq", "jct_mean": 11.2, "jct_p99": 83.1, **load}
    text = mlfq.verdict(f, m)
    assert "mean-JCT gain reproduces; the tail gain does NOT reproduce" in text
    idle = {"offered_req_s": 15.0, "served_req_s": 14.9}
    assert "NOT overloaded" in mlfq.verdict({**f, **idle}, m)
    f = {"name": "fcfs", "ttft_p50_prio1": 8.4, "ttft_p50_prio0": 8.5, **load}
    p = {"name": "priority", "ttft_p50_prio1": 0.02, "ttft_p50_prio0": 13.9, **load}
    assert "As expected under overload" in priority.verdict(f, p)
    assert "NOT overloaded" in priority.verdict({**f, **idle}, p)


def test_chunked_prefill_verdict_compares_by_budget_not_by_tbt():
    from experiments.configs import chunked_prefill

    def row(name, tbt, ttft):
        return {"name": name, "itl_p99": tbt / 1e3, "ttft_p50": ttft / 1e3}

    sf = [row("stall_free_512", 148, 282), row("stall_free_64", 37, 989)]
    text = chunked_prefill.verdict(sf, row("prefill_first_512", 241, 336))
    assert "smallest budget (stall_free_64) has P99 TBT 37.0 ms vs 148.0 ms" in text
    assert "the TBT gain reproduces, its TTFT cost reproduces" in text
    assert "the stall reproduces" in text
    text = chunked_prefill.verdict(sf, row("prefill_first_512", 100, 336))
    assert "the stall does NOT reproduce" in text


# ---------------------------------------------------------------------------
# Offered load set from the capacity measured on this machine
# ---------------------------------------------------------------------------


def test_offered_load_scales_rates_keeps_ratio_and_duration():
    from experiments import serving
    from experiments.configs import fairness

    c = fairness.get_config("default")
    assert c.workload.offered_load == 2.0
    scaled = serving.at_offered_load(c, capacity_req_s=3.0)
    c1, c2 = scaled.workload.clients
    assert c1["rate"] + c2["rate"] == pytest.approx(6.0)  # 2 x the measured capacity
    assert c2["rate"] == pytest.approx(2 * c1["rate"])  # the paper's 1 : 2
    assert (c1["num_requests"], c2["num_requests"]) == (60, 120)  # still 30 s of arrivals
    assert [cl["rate"] for cl in c.workload.clients] == [1.5, 3.0]  # the input is untouched


def test_capacity_is_measured_once_per_request_mix(tmp_path, monkeypatch):
    from experiments import serving
    from experiments.configs import fairness

    calls = []
    monkeypatch.setattr(serving, "measure_capacity", lambda c: calls.append(c) or 2.5)
    c = fairness.get_config("runlocal")
    cache = tmp_path / "capacity.json"
    assert serving.capacity(c, cache) == serving.capacity(c, cache) == 2.5
    c.serve.policy = "vtc"  # another point of the same sweep: same figure
    assert serving.capacity(c, cache) == 2.5 and len(calls) == 1
    c.serve.max_seqs = 4  # another engine: measured again
    serving.capacity(c, cache)
    assert len(calls) == 2


def test_backlogged_share_counts_time_with_every_client_queued():
    from mlx_sched.lab import slo

    def req(client, arrival, start, tokens):
        seq = types.SimpleNamespace(token_times=tokens, output=tokens)
        return types.SimpleNamespace(
            client=client, arrival=arrival, first_scheduled=start, prompt_len=1, seqs=[seq]
        )

    # a queued 0-5 and b queued 0-10 over a run from 0 to 10: both queued half the time
    reqs = [req("a", 0.0, 5.0, [5.0, 6.0]), req("b", 0.0, 10.0, [10.0])]
    assert slo.backlogged_share(reqs, points=1001) == pytest.approx(0.5, abs=0.01)
    assert slo.backlogged_share(reqs[:1]) == 0.0  # one client: no fairness regime


def test_bad_workload_clients_are_config_errors():
    from experiments import serving
    from experiments.configs import fairness
    from models.config import ModelConfig
    from models.errors import ConfigError

    model = types.SimpleNamespace(cfg=ModelConfig(vocab_size=264, max_seq_len=128))
    c = fairness.get_config("runlocal")
    c.workload.clients = [{**c.workload.clients[0], "input_lenn": 3}]
    with pytest.raises(ConfigError, match="unknown workload.clients key 'input_lenn'"):
        serving.make_trace(model, c)
    c.workload.clients = [{**fairness.get_config("runlocal").workload.clients[0], "rate": 0.0}]
    with pytest.raises(ConfigError, match="workload.clients 'c1': rate must be > 0"):
        serving.make_trace(model, c)
