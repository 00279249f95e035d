"""Workloads: arrival processes, length presets, trace round trip; metric definitions."""

import json

import numpy as np
import pytest

from mlx_sched.lab import workload
from mlx_sched.serve import metrics
from mlx_sched.serve.request import Request, SamplingParams, Status


def test_poisson_and_gamma_rates_and_burstiness():
    rng = np.random.default_rng(0)
    p = workload.poisson_arrivals(rng, 4.0, 20000)
    gaps = np.diff(p)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)
    g = workload.gamma_arrivals(rng, 4.0, 3.0, 20000)
    gaps = np.diff(g)
    assert gaps.mean() == pytest.approx(0.25, rel=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.15)


def test_onoff_arrivals_stay_in_on_periods():
    t = workload.onoff_arrivals(np.random.default_rng(1), 50.0, 500, on_s=1.0, off_s=2.0)
    assert len(t) == 500 and np.all(np.diff(t) > 0)
    assert np.all((t % 3.0) < 1.0)


@pytest.mark.parametrize("preset", sorted(workload.PRESETS))
def test_length_presets_have_the_reference_means(preset):
    din, dout = workload.PRESETS[preset]
    rng = np.random.default_rng(2)
    assert din.sample(rng, 40000).mean() == pytest.approx(din.mean, rel=0.05)
    assert dout.sample(rng, 40000).mean() == pytest.approx(dout.mean, rel=0.05)


def test_trace_is_seeded_fits_the_context_and_round_trips(tmp_path):
    a = workload.synthetic_trace(50, rate=2.0, max_total=256, seed=3, vocab=100)
    b = workload.synthetic_trace(50, rate=2.0, max_total=256, seed=3, vocab=100)
    assert a == b
    assert all(len(r.prompt) + r.max_tokens <= 256 and r.max_tokens >= 1 for r in a)
    assert all(max(r.prompt) < 100 for r in a)
    offline = workload.synthetic_trace(5, rate=None, seed=3)
    assert all(r.arrival == 0.0 for r in offline)
    workload.save_trace(a, tmp_path / "t.jsonl")
    assert workload.load_trace(tmp_path / "t.jsonl") == a
    with pytest.raises(ValueError, match="unknown length preset"):
        workload.synthetic_trace(5, None, preset="nope")


def test_request_metrics_definitions():
    req = Request("r", [1, 2, 3], SamplingParams(max_tokens=3), arrival=10.0)
    req.first_scheduled = 10.5
    seq = req.seqs[0]
    seq.tokens += [7, 8, 9]
    seq.token_times = [11.0, 11.5, 12.5]
    req.status = Status.FINISHED
    m = metrics.request_metrics(req)
    assert m["ttft"] == pytest.approx(1.0)
    assert m["tpot"] == pytest.approx(0.75)  # (12.5 - 11.0) / (3 - 1)
    assert m["itl"] == pytest.approx([0.5, 1.0])
    assert m["e2e"] == pytest.approx(2.5)
    assert m["normalized_latency"] == pytest.approx(2.5 / 3)
    assert m["scheduling_delay"] == pytest.approx(0.5)
    s = metrics.summarize([m], [], wall_s=5.0)
    assert s["output_tok_s"] == pytest.approx(3 / 5.0)
    assert s["ttft"]["p50"] == pytest.approx(1.0)
    # without the gaps (what aggregates read), and the gaps pooled apart: the same summary
    short = metrics.request_metrics(req, itl=False)
    assert short == {k: v for k, v in m.items() if k != "itl"}
    again = metrics.summarize([short], [], 5.0, itl=np.asarray(m["itl"]))
    assert json.dumps(again, sort_keys=True) == json.dumps(s, sort_keys=True)  # NaNs too


def test_step_summary_host_share_kv_live_and_peak():
    def rec(running, host, device, live, pages):
        return metrics.StepRecord(
            t=0.0, kind="decode", shape=(8, 1), num_decode=running, num_prefill_tokens=0,
            num_prefill_seqs=0, decode_ctx=0, prefill_attn=0, iters=1, new_tokens=running,
            running=running, waiting=0, pages_in_use=pages, live_tokens=live, host_s=host,
            device_s=device, page_size=16,
        )  # fmt: skip

    steps = [rec(2, 0.3, 0.7, 16, 2), rec(4, 0.1, 0.9, 60, 4), rec(4, 0.1, 0.9, 64, 4)]
    s = metrics.summarize([], steps, wall_s=3.0)
    assert s["host_share"] == pytest.approx(0.5 / 3.0)
    assert s["peak_running"] == 4
    assert s["host_share_at_peak"] == pytest.approx(0.2 / 2.0)  # only the steps with 4 running
    assert s["kv_live_fraction"]["p50"] == pytest.approx(60 / 64)
    assert s["buckets"] == {"decode[8, 1]": 3}
    assert "host share at peak (4 running)" in metrics.format_table(
        s | {"finished": 0, "requests": 0, "output_tok_s": 0.0, "total_tok_s": 0.0}
    )
