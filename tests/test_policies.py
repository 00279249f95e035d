"""Each policy's rule on small hand-built scenarios, in the simulator (same policy code,
modelled device time), plus the fairness and starvation properties."""

import numpy as np
import pytest

from mlx_sched.lab.simulator import SimClock, SimModel, SimRunner
from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.engine import Engine
from mlx_sched.serve.request import RequestError, SamplingParams
from models import ConfigError, ModelConfig

MC = ModelConfig(max_seq_len=2048)


def sim_engine(policy="fcfs", policy_args=None, **serve):
    kw = dict(
        page_size=8, num_pages=400, max_seqs=8, token_budget=64, max_prefill_rows=4, slice_len=1
    )
    kw.update(serve)
    cfg = ServeConfig(policy=policy, policy_args=policy_args or {}, **kw)
    clock = SimClock()
    return Engine(SimModel(MC), cfg, runner=SimRunner(MC, cfg, clock), clock=clock)


def add(engine, n_prompt, n_out, **kw):
    return engine.add_request([1] * n_prompt, SamplingParams(max_tokens=n_out), **kw)


def run_all(engine, limit=100000):
    for _ in range(limit):
        if not engine.has_work():
            return
        engine.step()
    raise AssertionError("did not finish")


def first_token_step(engine, rid):
    """Index of the step that produced the request's first token."""
    t = engine.requests[rid].seqs[0].token_times[0]
    return next(i for i, s in enumerate(engine.step_records) if s.t == t)


# -- baselines -----------------------------------------------------------------------------


def test_static_batching_waits_for_the_whole_batch_fcfs_does_not():
    for policy in ("static", "fcfs"):
        e = sim_engine(policy, max_seqs=2)
        short, long_ = add(e, 8, 4), add(e, 8, 40)
        third = add(e, 8, 4)
        run_all(e)
        r = e.requests
        if policy == "static":  # the third starts only after the long one finished
            assert r[third].first_scheduled >= r[long_].finished_at
        else:  # iteration-level: it takes the short one's slot right away
            assert r[third].first_scheduled < r[long_].finished_at
            assert r[third].first_scheduled >= r[short].finished_at
        e.pool.check()


def test_sarathi_prefill_first_stalls_decodes_stall_free_does_not():
    for variant in ("stall_free", "prefill_first"):
        e = sim_engine("sarathi", {"variant": variant}, token_budget=32)
        add(e, 8, 30)
        for _ in range(4):
            e.step()  # the first request is decoding
        add(e, 200, 4)  # a long prompt: 7 chunks of 32
        run_all(e)
        with_prefill = [s for s in e.step_records[4:] if s.num_prefill_tokens > 0]
        assert len(with_prefill) >= 6  # 192 uncached prompt tokens in chunks of <= 32
        decodes = [s.num_decode for s in with_prefill]
        if variant == "stall_free":
            assert all(d >= 1 for d in decodes)  # piggybacked: the decode never waits
            assert all(s.num_prefill_tokens <= 32 - s.num_decode for s in with_prefill)
        else:
            assert all(d == 0 for d in decodes)  # decodes stall behind every chunk


def test_sarathi_rejects_a_budget_beyond_the_compiled_one():
    with pytest.raises(ConfigError, match="exceeds the engine's compiled budget"):
        sim_engine("sarathi", {"token_budget": 128}, token_budget=64)
    with pytest.raises(ConfigError, match="variant must be one of"):
        sim_engine("sarathi", {"variant": "nope"})
    with pytest.raises(ConfigError, match="< page_size"):
        sim_engine("sarathi", {"token_budget": 4}, token_budget=64)  # page_size 8


# -- MLFQ -------------------------------------------------------------------------------------


def test_mlfq_skip_join_demotion_and_front_of_queue():
    e = sim_engine("mlfq", {"q0": 1e-3, "levels": 10})
    mlfq = e.policy
    short = add(e, 8, 50)
    long_prompt = add(e, 1500, 2)
    for rid, n in ((short, 8), (long_prompt, 1500)):  # the smallest level whose quantum fits
        t_prefill = e.sched.cost.prefill_time(n)
        lvl = mlfq.state[rid].level
        assert mlfq.quantum(lvl) >= t_prefill and (lvl == 0 or mlfq.quantum(lvl - 1) < t_prefill)
    assert mlfq.state[long_prompt].level > mlfq.state[short].level
    levels = []
    for _ in range(30):
        e.step()
        if short in mlfq.state:
            levels.append(mlfq.state[short].level)
    assert levels == sorted(levels) and levels[-1] > 0  # demoted as it used up its quanta
    run_all(e)


def test_mlfq_new_short_job_preempts_long_running_ones_at_token_level():
    e = sim_engine("mlfq", {"q0": 5e-3}, max_seqs=2)
    a, b = add(e, 8, 300), add(e, 8, 300)
    for _ in range(60):
        e.step()  # both demoted below level 0 by now
    assert min(e.policy.state[r].level for r in (a, b)) > 0
    c = add(e, 8, 3)
    assert e.policy.state[c].level == 0
    before = {r: len(e.requests[r].seqs[0].output) for r in (a, b)}
    e.step()
    # the newcomer runs at once; one long job (its slot) waits with its KV kept
    assert e.requests[c].first_scheduled is not None
    progressed = [r for r in (a, b) if len(e.requests[r].seqs[0].output) > before[r]]
    assert len(progressed) == 1
    assert all(e.requests[r].preemptions == 0 for r in (a, b))
    run_all(e)


@pytest.mark.parametrize("promote", [True, False])
def test_mlfq_never_starves_with_promotion(promote):
    """Short jobs keep the top queue busy; the long job finishes only with promotion."""
    args = {"q0": 5e-3, "promote_every": 20 if promote else 0, "starve_s": 0.02}
    e = sim_engine("mlfq", args, max_seqs=1)
    long_ = add(e, 8, 30)
    for _ in range(10):
        e.step()  # demoted
    for i in range(1500):  # short jobs keep arriving: the top level is never empty
        if i % 2 == 0:
            add(e, 8, 2)
        e.step()
    assert e.requests[long_].is_finished == promote


# -- VTC ---------------------------------------------------------------------------------------


def test_vtc_counters_lift_and_weights():
    e = sim_engine("vtc", {"weights": {"b": 2.0}}, max_seqs=1)
    vtc = e.policy
    a1 = add(e, 10, 3, client="a")
    add(e, 10, 3, client="a")  # a stays backlogged
    e.step()  # a1 admitted: c_a = w_in * 10
    assert vtc.counter["a"] == pytest.approx(10.0 + 2.0)  # + its first token (w_out = 2)
    while not e.requests[a1].is_finished:
        e.step()
    assert vtc.counter["a"] == pytest.approx(10.0 + 3 * 2.0)
    # b arrives after idling while a is backlogged: lifted to a's counter
    add(e, 10, 3, client="b")
    assert vtc.counter["b"] == pytest.approx(vtc.counter["a"])
    lifted = vtc.counter["b"]
    run_all(e)
    # weight 2: b's service is charged at half rate
    assert vtc.counter["b"] == pytest.approx(lifted + (10.0 + 3 * 2.0) / 2.0)


def test_vtc_admits_the_client_with_the_smallest_counter():
    e = sim_engine("vtc", max_seqs=1)
    for _ in range(3):
        add(e, 10, 2, client="heavy")
    light = add(e, 10, 2, client="light")
    e.policy.counter["heavy"] = 100.0  # heavy already received service
    e.step()
    assert e.requests[light].first_scheduled is not None  # overtakes three older requests


def service_difference(engine, clients, w_in=1.0, w_out=2.0):
    """Max over time of the service gap between clients while both were backlogged."""
    events = []
    for r in engine.requests.values():
        events.append((r.first_scheduled, r.client, w_in * r.prompt_len))
        events += [(t, r.client, w_out) for t in r.seqs[0].token_times]
    events.sort(key=lambda x: x[0])
    served = dict.fromkeys(clients, 0.0)
    last_arrival = {
        c: max(r.arrival for r in engine.requests.values() if r.client == c) for c in clients
    }
    first_done = min(
        max(r.finished_at for r in engine.requests.values() if r.client == c) for c in clients
    )
    worst = 0.0
    for t, c, amount in events:
        served[c] += amount
        if t <= min(first_done, *last_arrival.values()):
            worst = max(worst, abs(served[clients[0]] - served[clients[1]]))
    return worst


def test_vtc_service_difference_stays_bounded_under_random_overload():
    rng = np.random.default_rng(0)
    max_in, max_out = 40, 40
    diffs = {}
    for policy in ("vtc", "fcfs"):
        e = sim_engine(policy, max_seqs=4)
        t = 0.0
        for _ in range(300):  # client a sends 3x as many requests as b: overload
            t += rng.exponential(0.01)
            client = "a" if rng.random() < 0.75 else "b"
            e.add_request(
                [1] * int(rng.integers(5, max_in)),
                SamplingParams(max_tokens=int(rng.integers(5, max_out))),
                client=client,
                arrival=t,
            )
        run_all(e)
        diffs[policy] = service_difference(e, ["a", "b"])
    bound = 2 * (1.0 * max_in + 2.0 * max_out) * 4  # 2U per concurrent slot (max_seqs = 4)
    assert diffs["vtc"] <= bound
    assert diffs["fcfs"] > 3 * diffs["vtc"]


def test_vtc_rejects_negative_weights():
    with pytest.raises(ConfigError, match="weights must be > 0"):
        sim_engine("vtc", {"weights": {"a": -1.0}})


# -- slice-level ----------------------------------------------------------------------------


def test_slice_level_membership_is_fixed_within_a_slice():
    e = sim_engine("slice", {"slice_tokens": 8}, slice_len=4, max_seqs=4)
    a = add(e, 8, 20)
    e.step()  # slice 1 formed with a alone
    late = add(e, 8, 4)
    steps = 0
    while len(e.requests[a].seqs[0].output) < 8:
        e.step()
        steps += 1
        assert e.requests[late].first_scheduled is None  # waits for the slice boundary
    e.step()
    assert e.requests[late].first_scheduled is not None  # joined the next slice
    run_all(e)
    assert e.policy.slices >= 3
    for r in e.requests.values():  # no slice gave anyone more than slice_tokens
        assert len(r.seqs[0].output) in (4, 20)


# -- priority --------------------------------------------------------------------------------


def test_priority_class_preempts_lower_and_the_victim_keeps_its_place():
    e = sim_engine("priority", {"mode": "class"}, max_seqs=2)
    low1, low2 = add(e, 8, 30, priority=0), add(e, 8, 30, priority=0)
    for _ in range(3):
        e.step()
    low3 = add(e, 8, 5, priority=0)
    high = add(e, 8, 5, priority=5)
    e.step()
    r = e.requests
    assert r[high].first_scheduled is not None
    assert r[low2].preemptions == 1 and r[low1].preemptions == 0  # the lowest-ranked: later
    run_all(e)
    assert r[low2].first_scheduled < r[low3].first_scheduled  # kept its place ahead of low3
    order = sorted(r, key=lambda i: r[i].finished_at)
    assert order.index(high) < order.index(low3)


def test_priority_sjf_runs_short_jobs_first_and_ages_long_ones():
    e = sim_engine("priority", {"mode": "sjf", "aging": 0.0}, max_seqs=1)
    first = add(e, 8, 20)
    long_, short = add(e, 8, 100), add(e, 8, 5)
    run_all(e)
    r = e.requests
    assert r[short].finished_at < r[long_].finished_at
    assert r[first].preemptions == 0
    aged = sim_engine("priority", {"mode": "sjf", "aging": 1e6}, max_seqs=1)
    add(aged, 8, 20)
    long_ = add(aged, 8, 100, arrival=0.0)
    short = add(aged, 8, 5, arrival=0.5)
    run_all(aged)
    assert aged.requests[long_].finished_at < aged.requests[short].finished_at


def test_priority_deadline_serves_the_most_urgent_first():
    e = sim_engine("priority", {"mode": "deadline", "preempt": False}, max_seqs=1)
    add(e, 8, 10)
    relaxed = add(e, 8, 3, deadline=100.0)
    urgent = add(e, 8, 3, deadline=0.5)
    none = add(e, 8, 3)
    run_all(e)
    r = e.requests
    assert r[urgent].first_scheduled < r[relaxed].first_scheduled < r[none].first_scheduled
    with pytest.raises(RequestError, match="in the past"):
        add(e, 8, 3, deadline=e.clock() - 1.0)


def test_unknown_policy_and_bad_args_are_config_errors():
    with pytest.raises(ConfigError, match="unknown policy 'nope'"):
        sim_engine("nope")
    with pytest.raises(ConfigError, match="did you mean 'mode'"):
        sim_engine("priority", {"mdoe": "sjf"})
    with pytest.raises(ConfigError, match="slice_tokens must be >= 1"):
        sim_engine("slice", {"slice_tokens": 0})
