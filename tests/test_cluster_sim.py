"""The cluster over simulated instances (cluster.sim) and DistServe's placement search
(cluster.placement): the same global-scheduler code, event-driven in simulated time."""

from __future__ import annotations

import gc
import json
import math

import numpy as np
import pytest

from mlx_sched.cluster import dispatch as dispatch_lib
from mlx_sched.cluster import migration as migration_lib
from mlx_sched.cluster import placement as pl
from mlx_sched.cluster.config import ClusterConfig
from mlx_sched.cluster.records import ClusterRequest, pooled_itl
from mlx_sched.cluster.sim import GC_THRESHOLD, Scaled, SimCluster, gc_tuned
from mlx_sched.lab.workload import synthetic_trace
from mlx_sched.serve import metrics as metrics_lib
from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.cost_model import StepTimeModel
from mlx_sched.serve.request import SamplingParams
from models import ModelConfig
from models.errors import ConfigError

MC = ModelConfig(
    vocab_size=256, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=128, max_seq_len=512
)
SERVE = ServeConfig(page_size=8, num_pages=160, max_seqs=16, token_budget=128, slice_len=4)


def trace(n=60, rate=40.0, seed=0, cv=None):
    return synthetic_trace(n, rate, "sharegpt", 256, 1.0, cv, MC.vocab_size, seed=seed)


def run(cfg, tr=None, **kw):
    sim = SimCluster(MC, SERVE, cfg, **kw)
    out = sim.run(tr or trace())
    return sim, out


def assert_complete(sim, tr):
    """Every request finished with exactly its length, and every pool is consistent."""
    reqs = sim.cluster.requests
    assert len(reqs) == len(tr)
    for i, r in enumerate(tr):
        req = reqs[f"r{i}"]
        assert req.status == "finished", (req.id, req.status, req.error)
        assert len(req.outputs[0]) == r.max_tokens
        assert len(req.times[0]) == r.max_tokens
        assert req.times[0] == sorted(req.times[0])
        assert req.times[0][0] >= r.arrival
    sim.cluster.check()
    assert not sim.cluster.moves


@pytest.mark.parametrize("dispatch", ["round_robin", "least_loaded", "llumnix"])
def test_colocated_cluster_serves_every_request(dispatch):
    tr = trace()
    sim, out = run(ClusterConfig(num_instances=3, dispatch=dispatch), tr)
    assert_complete(sim, tr)
    assert out["sim"]["batches"] >= out["sim"]["steps"] > 0
    per = [e.runner.steps for e in sim.engines]
    assert all(per), per  # the load spreads over every instance


def test_disaggregated_hands_every_request_over():
    tr = trace()
    sim, out = run(ClusterConfig(num_instances=3, roles=("prefill", "decode", "decode")), tr)
    assert_complete(sim, tr)
    assert out["handovers"] == len(tr)
    assert {r.instance for r in sim.cluster.requests.values()} <= {1, 2}
    # the decode instances decode, the prefill one only prefills (one token each)
    prefill = sim.engines[0]
    assert (
        sum(len(s.tokens) - len(r.prompt) for r in prefill.requests.values() for s in r.seqs) == 0
    )
    kv_bytes = out["kv_bytes_moved"]
    assert kv_bytes > 0
    assert out["kv_seconds"] == pytest.approx(kv_bytes / sim.cluster.mover.link)


def test_slow_link_delays_decoding_not_the_first_token():
    tr = trace(n=20, rate=5.0)
    cfg = ClusterConfig(num_instances=2, roles=("prefill", "decode"))
    _, fast = run(cfg, tr)
    _, slow = run(cfg, tr, link_bytes_per_s=2e5)
    assert slow["ttft"]["mean"] == pytest.approx(fast["ttft"]["mean"], rel=1e-6)
    assert slow["e2e"]["mean"] > fast["e2e"]["mean"]


def test_the_simulation_is_deterministic():
    cfg = ClusterConfig(num_instances=3, migration=True)
    tr = trace(n=80, rate=200.0, cv=3.0)
    _, a = run(cfg, tr)
    _, b = run(cfg, tr)
    for key in ("ttft", "tpot", "e2e", "migrations", "kv_bytes_moved"):
        assert a[key] == b[key], key


def test_the_same_policy_objects_run(monkeypatch):
    """The simulated cluster calls the real dispatch and migration policies and mover."""
    calls = {"choose": 0, "pick": 0, "advance": 0}

    def counting(cls, name):
        orig = getattr(cls, name)

        def wrapped(self, *a, **k):
            calls[name] += 1
            return orig(self, *a, **k)

        monkeypatch.setattr(cls, name, wrapped)

    counting(dispatch_lib.Llumnix, "choose")
    counting(migration_lib.MigrationPolicy, "pick")
    counting(migration_lib.Mover, "advance")
    tr = trace(n=80, rate=400.0, cv=3.0)
    sim, out = run(ClusterConfig(num_instances=3, migration=True), tr)
    assert_complete(sim, tr)
    assert calls["choose"] == len(tr)
    assert calls["pick"] > 0
    assert out["migrations"] > 0 and calls["advance"] > 0
    assert isinstance(sim.cluster.dispatch, dispatch_lib.Llumnix)


def test_migration_downtime_is_the_last_stage_over_the_link():
    tr = trace(n=80, rate=400.0, cv=3.0)
    link = 1e6
    sim, out = run(ClusterConfig(num_instances=3, migration=True), tr, link_bytes_per_s=link)
    assert_complete(sim, tr)
    done = [m for m in sim.cluster.move_log if m["kind"] == "migration" and m["outcome"] == "done"]
    assert done
    for m in done:
        assert 0 <= m["downtime"] <= m["seconds"] + 1e-12
        assert m["seconds"] == pytest.approx(m["bytes"] / link)


def test_shared_host_steps_one_instance_at_a_time():
    tr = trace(n=40, rate=1000.0)
    cfg = ClusterConfig(num_instances=2)
    par, a = run(cfg, tr)
    ser, b = run(cfg, tr, shared_host=True)
    assert b["wall_s"] > a["wall_s"]

    def busy(sim):
        return sum(r.device_s for e in sim.engines for r in e.step_records)  # modelled

    assert busy(ser) <= b["wall_s"] + 1e-9  # one host: the steps never overlap
    assert busy(par) > a["wall_s"]  # two: they do


def test_speedups_divide_device_time():
    base = StepTimeModel()
    fast = Scaled(base, 2.0)
    from mlx_sched.serve.shapes import Shape

    shape = Shape("mixed", 8, 1, 64)
    args = (shape, 2, 2, 64, 2048, 1, 40, 1)
    b0, d0, a0 = base.simulate(*args)
    b1, d1, a1 = fast.simulate(*args)
    assert (b1, a1) == (b0, a0) and d1 == pytest.approx(d0 / 2)
    with pytest.raises(ValueError, match="speedups"):
        SimCluster(MC, SERVE, ClusterConfig(num_instances=2), speedups=[1.0])
    tr = trace(n=30, rate=30.0)
    _, slow = run(ClusterConfig(num_instances=1), tr)
    _, quick = run(ClusterConfig(num_instances=1), tr, speedups=[4.0])
    assert quick["tpot"]["mean"] < slow["tpot"]["mean"]


# -- placement ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, "1"])
def test_slo_must_be_positive(bad):
    with pytest.raises(ConfigError, match="positive"):
        pl.SLO(ttft_s=bad, tpot_s=0.1)
    with pytest.raises(ConfigError, match="positive"):
        pl.SLO(ttft_s=0.1, tpot_s=bad)
    with pytest.raises(ConfigError, match="attainment"):
        pl.SLO(0.1, 0.1, attainment=1.5)


def test_layouts_fit_the_devices():
    got = pl.layouts(4, parallel=(1, 2))
    assert all(lay.devices <= 4 for lay in got)
    assert pl.Layout(0, 4) in got and pl.Layout(1, 3) in got and pl.Layout(1, 1, 2, 2) in got
    assert pl.Layout(0, 2, 1, 2) in got and pl.Layout(2, 2) in got
    assert len(set(got)) == len(got)
    assert pl.layouts(1) == [pl.Layout(0, 1)]  # one device: no room to disaggregate
    assert pl.Layout(1, 2).roles == ("prefill", "decode", "decode")
    assert pl.Layout(0, 2).roles == ("both", "both")
    with pytest.raises(ConfigError):
        pl.layouts(0)


def test_goodput_finds_the_threshold():
    slo = pl.SLO(1.0, 1.0)

    def fake(rate):  # attainment falls below 0.9 past 7.3 requests/s
        return pl.Point(rate, 1.0 if rate <= 7.3 else 0.5, 0.0, 0.0)

    g, points = pl.goodput(fake, slo, start=1.0, iters=10)
    assert 7.3 - 8 / 2**10 <= g <= 7.3
    assert [p.rate for p in points[:4]] == [1.0, 2.0, 4.0, 8.0]
    never, _ = pl.goodput(lambda r: pl.Point(r, 0.0, 0, 0), slo, start=1.0)
    assert never == 0.0


def test_search_picks_the_most_goodput_per_device():
    wl = pl.Workload(max_total=256, num_requests=40)
    best, table = pl.search(MC, SERVE, wl, pl.SLO(0.2, 0.02), 3, start_rate=4.0, iters=2)
    assert len(table) == len(pl.layouts(3))
    assert best.per_device == max(c.per_device for c in table)
    for c in table:
        ok = [p for p in c.points if p.attainment >= 0.9]
        assert c.goodput == (max(p.rate for p in ok) if ok else 0.0)
    # a looser SLO never lowers a layout's goodput
    _, loose = pl.search(MC, SERVE, wl, pl.SLO(2.0, 0.2), 3, start_rate=4.0, iters=2)
    for a, b in zip(table, loose, strict=True):
        assert b.goodput >= a.goodput


@pytest.mark.slow
def test_validate_on_real_engines():
    from tests.tests_cluster_common import MC as TINY
    from tests.tests_cluster_common import SERVE as TINY_SERVE
    from tests.tests_cluster_common import model_for_tests

    model = model_for_tests()
    wl = pl.Workload(max_total=64, num_requests=8)
    out = pl.validate(model, TINY_SERVE, pl.Layout(1, 1), wl, 4.0, pl.SLO(10.0, 1.0))
    assert out["attainment"] == 1.0
    assert out["compiles_after_warmup"] == [0, 0]
    assert TINY.vocab_size == model.cfg.vocab_size


def test_sampling_params_reach_the_simulated_engines():
    tr = trace(n=10, rate=10.0)
    sim = SimCluster(MC, SERVE, ClusterConfig(num_instances=2))
    sim.run(tr, sampling=SamplingParams(temperature=0.7, seed=3))
    for i in range(len(tr)):
        req = sim.cluster.requests[f"r{i}"]
        assert req.sampling.temperature == 0.7 and req.sampling.seed == 3 + i


def test_one_instance_cluster_equals_the_single_engine_simulator():
    """A request arriving while the instance's step is under way is served at its next
    step (a report taken after the arrival does not mark the instance idle)."""
    from mlx_sched.lab.replay import replay
    from mlx_sched.lab.simulator import sim_engine

    tr = trace(n=40, rate=8.0, seed=3)
    sim, _ = run(ClusterConfig(num_instances=1), tr)
    one = sim_engine(MC, SERVE, seed=0)
    replay(one, tr)
    for rid, r in one.requests.items():
        got = sim.cluster.requests[rid]
        assert got.times[0] == pytest.approx(r.seqs[0].token_times, abs=1e-12), rid


def test_a_shared_host_starves_no_instance():
    """On one host, an instance that gets work steps before a busy one steps again (ties go
    to the instance that waited longest), not once the busy one runs out of work."""
    from mlx_sched.lab.workload import TraceRequest

    tr = [TraceRequest(0.0, list(range(1, 30)), 200), TraceRequest(0.05, list(range(1, 9)), 4)]
    sim, _ = run(ClusterConfig(num_instances=2, dispatch="round_robin"), tr, shared_host=True)
    assert_complete(sim, tr)
    long, short = sim.cluster.requests["r0"], sim.cluster.requests["r1"]
    assert (long.instance, short.instance) == (0, 1)
    longest = max(r.device_s for e in sim.engines for r in e.step_records)
    assert short.times[0][0] - short.arrival <= 3 * longest
    assert short.times[0][-1] < long.times[0][-1] / 2


def test_several_migrations_in_flight():
    """`migration_max_moves` migrations run at once (Llumnix moves between several pairs);
    never more, and everything still completes."""
    from mlx_sched.cluster import cluster as cluster_lib

    peak = {"moves": 0}
    orig = cluster_lib.Cluster._maybe_migrate

    def spy(self):
        orig(self)
        peak["moves"] = max(peak["moves"], sum(m.kind == "migration" for m in self.moves.values()))

    tr = trace(n=120, rate=600.0, cv=3.0, seed=2)
    for k in (1, 3):
        peak["moves"] = 0
        cfg = ClusterConfig(num_instances=4, migration=True, migration_max_moves=k)
        cluster_lib.Cluster._maybe_migrate = spy
        try:
            sim, out = run(cfg, tr, link_bytes_per_s=5e5)  # slow copies: moves overlap
        finally:
            cluster_lib.Cluster._maybe_migrate = orig
        assert_complete(sim, tr)
        assert 1 <= peak["moves"] <= k
    assert peak["moves"] > 1


def test_grid_goodputs_serve_each_rate_once_for_every_slo():
    served = []

    def fake(rate):  # every request's TTFT grows with the rate
        served.append(rate)
        return [{"status": "finished", "ttft": rate / 10, "tpot": 0.01}] * 10

    loose, tight = pl.SLO(1.0, 1.0), pl.SLO(0.3, 1.0)
    best, rows = pl.grid_goodputs(fake, [loose, tight], start=1.0, factor=2.0)
    assert served == [1.0, 2.0, 4.0, 8.0, 16.0]  # until both fail
    assert best == [8.0, 2.0]
    assert [r["rate"] for r in rows] == served
    with pytest.raises(ConfigError):
        pl.grid_goodputs(fake, [loose], start=1.0, factor=1.0)


def test_simulated_metrics_cover_every_request():
    wl = pl.Workload(max_total=256, num_requests=20, min_duration_s=2.0)
    assert wl.count(5.0) == 20 and wl.count(50.0) == 100
    ms = pl.simulated_metrics(MC, SERVE, pl.Layout(1, 1), wl, 50.0)
    assert len(ms) == 100 and all(m["status"] == "finished" for m in ms)


def test_pooled_itl_lists_the_gaps_metrics_lists():
    rng = np.random.default_rng(0)
    reqs = []
    for i in range(40):
        n = int(rng.integers(1, 4))  # sequences, some with no token or one token
        times = [np.cumsum(rng.random(int(rng.integers(0, 6)))).tolist() for _ in range(n)]
        outputs = [[5] * len(t) for t in times]
        sp = SamplingParams(n=n)
        reqs.append(ClusterRequest(f"r{i}", [1], sp, "c", 0, 0.0, None, -1, outputs, times))
    want = [x for r in reqs for x in r.metrics().get("itl", [])]
    for chunk in (1, 7, 4096):
        got = pooled_itl(reqs, chunk)
        assert got.dtype == np.float64 and got.tolist() == want  # the same floats, in order
    assert pooled_itl([]).shape == (0,)
    assert all("itl" not in r.metrics(itl=False) for r in reqs)


def test_cluster_summary_equals_the_summary_of_its_request_metrics():
    tr = trace(n=60, rate=200.0, cv=3.0)
    sim, out = run(ClusterConfig(num_instances=3, migration=True), tr)
    wall = sim.now - min(r.arrival for r in tr)
    want = metrics_lib.summarize(sim.cluster.request_metrics(), [], wall)
    got = {k: out[k] for k in want}
    assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)  # NaNs too


def test_gc_tuned_sets_the_threshold_and_restores_it():
    before = gc.get_threshold()
    with pytest.raises(KeyError), gc_tuned((1234, 5, 6)):
        assert gc.get_threshold() == (1234, 5, 6)
        raise KeyError
    assert gc.get_threshold() == before
    with gc_tuned():
        assert gc.get_threshold() == GC_THRESHOLD
    run(ClusterConfig(num_instances=1), trace(n=3))
    assert gc.get_threshold() == before  # a simulation leaves the process as it found it


def test_has_work_follows_the_unfinished_requests():
    sim = SimCluster(MC, SERVE, ClusterConfig(num_instances=2))
    c = sim.cluster
    assert not c.has_work()
    a = c.add_request([1, 2, 3], SamplingParams(max_tokens=2))
    b = c.add_request([4, 5, 6], SamplingParams(max_tokens=2))
    assert c.has_work()
    c.abort(a)
    assert c.has_work()
    c.requests[b].finished = True  # marked from outside: noticed too
    assert not c.has_work()
    sim = SimCluster(MC, SERVE, ClusterConfig(num_instances=2))
    sim.run(trace(n=8))
    assert not sim.cluster.has_work() and not sim.cluster._open
