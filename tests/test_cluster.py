"""Many engines in process: dispatch, hand-overs (DistServe), live migration (Llumnix),
instance faults. Every cluster's outputs are compared with one engine's on the same
requests (greedy, and seeded sampling: sampling keys depend on seed and position only)."""

from __future__ import annotations

import dataclasses
import math
import socket

import numpy as np
import pytest
from tests_cluster_common import MC, SERVE, make_requests, model_for_tests

from mlx_sched.cluster import Cluster, ClusterConfig, ClusterError, Load
from mlx_sched.cluster.backends import Done, LocalInstance
from mlx_sched.cluster.dispatch import make_dispatch
from mlx_sched.cluster.migration import MigrationPolicy
from mlx_sched.serve.engine import Engine
from mlx_sched.serve.request import RequestError, SamplingParams
from models.errors import ConfigError


@pytest.fixture(scope="module")
def model():
    return model_for_tests()


@pytest.fixture(scope="module")
def reference(model):
    """One engine's outputs for make_requests(seed)."""
    engine = Engine(model, SERVE)
    cache = {}

    def outputs(seed: int, count: int = 8, scale: int = 1):
        if (seed, count, scale) not in cache:
            prompts, params = make_requests(seed, count, scale)
            cache[seed, count, scale] = [o.outputs for o in engine.generate(prompts, params)]
        return cache[seed, count, scale]

    return outputs


def build(model, **kw) -> Cluster:
    return Cluster.build(model, SERVE, ClusterConfig(**kw))


def run(cluster: Cluster, ids, hook=None):
    steps = 0
    while cluster.has_work():
        cluster.step()
        steps += 1
        if hook is not None:
            hook(cluster, steps)
    return [cluster.requests[i].outputs for i in ids]


def add_all(cluster, seed, count=8, scale=1):
    prompts, params = make_requests(seed, count, scale)
    return [cluster.add_request(p, s) for p, s in zip(prompts, params, strict=True)]


def assert_clean(cluster: Cluster):
    """Pools consistent on every live instance, nothing held after the run, no compiles."""
    cluster.check()
    for i, inst in enumerate(cluster.instances):
        if i in cluster.dead:
            continue
        engine = inst.server.engine
        assert engine.pool.num_in_use == 0, f"instance {i} still holds pages"
        assert not engine._imports and not engine.sched.paused
    assert cluster.summary(1.0)["compiles_after_warmup"] == [0] * len(cluster.instances)


# -- dispatch and migration policies on hand-built loads -------------------------------------


def load(free, running, waiting=0, hol=0, high=0):
    return Load(100, free, running, waiting, hol, 8, high)


def test_freeness_is_llumnix_formula():
    assert load(50, 4).freeness() == 50 / 4
    assert load(50, 4, waiting=2, hol=10).freeness() == (50 - 10) / 5
    assert load(50, 4, high=2).freeness(headroom_pages=5) == (50 - 10) / 4
    assert load(80, 0).freeness() == math.inf


def test_dispatch_policies_choose_as_specified():
    loads = [load(10, 6), load(60, 3), load(40, 1, waiting=1, hol=30)]
    assert make_dispatch("llumnix").choose(loads, 4) == 1  # 60/3 > 10/6 and (40-30)/2
    assert make_dispatch("least_loaded").choose(loads, 4) == 2  # 1 + 1 waiting < 3 < 6
    rr = make_dispatch("round_robin")
    assert [rr.choose(loads, 4) for _ in range(4)] == [0, 1, 2, 0]
    idle = [load(10, 3), load(30, 0), load(50, 0)]
    assert make_dispatch("llumnix").choose(idle, 4) == 2  # idle instances: the most free pages
    # headroom: an instance running high-priority requests looks fuller
    hp = [load(50, 2, high=2), load(40, 2)]
    assert make_dispatch("llumnix").choose(hp, 4) == 0
    assert make_dispatch("llumnix", headroom_pages=10).choose(hp, 4) == 1
    with pytest.raises(ClusterError, match="unknown dispatch policy 'fastest'"):
        make_dispatch("fastest")


def test_migration_policy_pairs_least_and_most_free():
    policy = MigrationPolicy(low=4.0)
    reqs = {0: [("a", 0, 6, 24), ("b", 0, 2, 8)], 1: [], 2: [("c", 0, 1, 3)]}
    loads = [load(4, 3, waiting=1, hol=8), load(90, 0), load(50, 1)]
    assert policy.pick(loads, set(), reqs.get) == (0, 1, "b")  # the cheapest request moves
    assert policy.pick(loads, {1}, reqs.get) == (0, 2, "b")  # instance 1 is busy moving
    calm = [load(60, 3), load(90, 0)]  # freeness 20 >= low and nobody waits: no migration
    assert policy.pick(calm, set(), reqs.get) is None
    assert policy.pick([loads[0], None], set(), reqs.get) is None  # a dead peer
    hp = MigrationPolicy(low=4.0, headroom_pages=4)  # high-priority requests stay put
    assert hp.pick(loads, set(), {0: [("a", 1, 6, 24)]}.get) is None


# -- one engine's outputs through the cluster --------------------------------------------------


@pytest.mark.parametrize(
    "dispatch",
    [
        pytest.param("round_robin", marks=pytest.mark.slow),
        pytest.param("least_loaded", marks=pytest.mark.slow),
        "llumnix",
    ],
)
def test_cluster_outputs_equal_one_engine(model, reference, dispatch):
    cluster = build(model, num_instances=2, dispatch=dispatch)
    ids = add_all(cluster, seed=0)
    assert run(cluster, ids) == reference(0)
    assert {cluster.requests[i].instance for i in ids} == {0, 1}  # both instances served
    assert_clean(cluster)


def test_generate_and_stream(model, reference):
    cluster = build(model, num_instances=2)
    prompts, params = make_requests(0)
    assert [o.outputs for o in cluster.generate(prompts, params)] == reference(0)
    rid = cluster.add_request(prompts[0], params[0])
    streamed = [t for toks in cluster.stream(rid) for t in toks[0]]
    assert streamed == reference(0)[0][0]
    assert cluster.requests[rid].finish_reasons == ["length"]


@pytest.mark.parametrize(
    "roles",
    [pytest.param(("prefill", "decode"), marks=pytest.mark.slow), ("prefill", "decode", "decode")],
)
def test_disaggregated_prefill_then_decode(model, reference, roles):
    cluster = build(model, num_instances=len(roles), roles=roles, chunk_pages=2)
    ids = add_all(cluster, seed=1)
    assert run(cluster, ids) == reference(1)
    s = cluster.summary(1.0)
    single = [i for i in ids if cluster.requests[i].sampling.n == 1]
    assert s["handovers"] == len(single) and s["kv_bytes_moved"] > 0
    for i in single:  # every n = 1 request ended on a decode instance
        assert roles[cluster.requests[i].instance] == "decode"
    # chunked: a hand-over of p pages took ceil(p / 2) cluster steps of copying
    assert all(m["outcome"] == "done" for m in cluster.move_log)
    assert_clean(cluster)


def test_forced_migrations_at_random_points(model, reference):
    cluster = build(model, num_instances=3, chunk_pages=2, last_stage_pages=1)
    ids = add_all(cluster, seed=2, count=12, scale=3)
    rng = np.random.default_rng(7)

    def migrate_some(c, step):
        for rid in ids:
            r = c.requests[rid]
            if r.finished or rid in c.moves or rng.random() > 0.3 or r.sampling.n > 1:
                continue
            c.migrate(rid, int(rng.choice([i for i in range(3) if i != r.instance])))

    assert run(cluster, ids, migrate_some) == reference(2, 12, 3)
    done = [m for m in cluster.move_log if m["outcome"] == "done"]
    assert len(done) >= 5 and any(m["stages"] >= 2 for m in done)
    assert sum(cluster.requests[i].migrations for i in ids) == len(done)
    assert_clean(cluster)


def test_pipelined_migration_stops_after_a_small_stage(model):
    """A long request migrates in stages; the last stage copies at most last_stage_pages
    pages (plus the partial page) or comes after max_stages stages."""
    cluster = build(model, num_instances=2, chunk_pages=64, last_stage_pages=2, max_stages=3)
    prompt = list(range(1, 60))
    rid = cluster.add_request(prompt, SamplingParams(max_tokens=40, ignore_eos=True))
    cluster.step()
    cluster.step()
    cluster.migrate(rid, 1 - cluster.requests[rid].instance)
    while cluster.has_work():
        cluster.step()
    (move,) = cluster.move_log
    assert move["outcome"] == "done" and 2 <= move["stages"] <= 3
    ref = Engine(model, SERVE).generate([prompt], SamplingParams(max_tokens=40, ignore_eos=True))
    assert cluster.requests[rid].outputs == ref[0].outputs
    assert_clean(cluster)


class Flaky(LocalInstance):
    """An in-process instance whose k-th call of `method` fails (returns False for a
    reservation, raises otherwise)."""

    def __init__(self, inner: LocalInstance, method: str, k: int):
        super().__init__(inner.server)
        self.method, self.k, self.seen = method, k, 0

    def call(self, method, *args):
        if method == self.method:
            self.seen += 1
            if self.seen == self.k:
                if method == "reserve_import":
                    return Done(False)
                return Done(error=RuntimeError(f"injected failure of {method}"))
        return super().call(method, *args)


@pytest.mark.parametrize(
    "method,k",
    [
        ("reserve_import", 2),
        ("write_kv", 1),
        ("import_request", 1),
        *[
            pytest.param(m, k, marks=pytest.mark.slow)
            for m in ("reserve_import", "write_kv", "import_request")
            for k in (1, 2, 3)
            if (m, k) not in {("reserve_import", 2), ("write_kv", 1), ("import_request", 1)}
        ],
    ],
)
def test_migration_aborted_at_every_stage_leaves_pools_consistent(model, method, k):
    cluster = build(model, num_instances=2, chunk_pages=2, last_stage_pages=1, max_stages=3)
    prompt = list(range(5, 50))
    sp = SamplingParams(max_tokens=30, ignore_eos=True)
    rid = cluster.add_request(prompt, sp)
    src = cluster.requests[rid].instance
    dst = 1 - src
    cluster.instances[dst] = Flaky(cluster.instances[dst], method, k)
    cluster.mover.instances = cluster.instances
    cluster.step()
    cluster.migrate(rid, dst)
    while cluster.has_work():
        cluster.step()
        cluster.check()  # after every step: no page lost or leaked on either side
    outcomes = [m["outcome"] for m in cluster.move_log]
    if cluster.instances[dst].seen >= k:  # the failure happened: the move was aborted
        assert outcomes[0].startswith("aborted") and cluster.requests[rid].instance == src
    ref = Engine(model, SERVE).generate([prompt], sp)
    assert cluster.requests[rid].outputs == ref[0].outputs
    assert_clean(cluster)


def test_a_reservation_lowers_the_destinations_free_pages_at_once(model):
    """Pages a move reserves on its destination count against that instance's free pages
    before its next report, so dispatch does not send it requests for the same pages."""
    cluster = build(model, num_instances=2, chunk_pages=64, last_stage_pages=1, max_stages=3)
    rid = cluster.add_request(list(range(1, 60)), SamplingParams(max_tokens=40, ignore_eos=True))
    cluster.step()
    cluster.step()
    dst = 1 - cluster.requests[rid].instance
    before = cluster.loads[dst].free_pages
    reserved = []
    cluster.mover.on_reserved = lambda i, n: (reserved.append((i, n)), cluster._reserved(i, n))
    cluster.migrate(rid, dst)
    cluster.coordinate()  # the first stage: reserve, copy (no step, so no report yet)
    assert reserved and reserved[0][0] == dst
    assert cluster.loads[dst].free_pages == before - sum(n for _, n in reserved)
    while cluster.has_work():
        cluster.step()
    assert_clean(cluster)


def test_migration_aborted_when_the_request_ends_or_is_aborted(model):
    cluster = build(model, num_instances=2, chunk_pages=1)
    sp = SamplingParams(max_tokens=3, ignore_eos=True)
    a = cluster.add_request(list(range(1, 40)), sp)  # finishes while its 10 pages move
    b = cluster.add_request(list(range(1, 40)), SamplingParams(max_tokens=30, ignore_eos=True))
    cluster.step()
    for rid in (a, b):
        cluster.migrate(rid, 1 - cluster.requests[rid].instance)
    cluster.step()
    cluster.abort(b)
    while cluster.has_work():
        cluster.step()
    outcomes = {m["request_id"]: m["outcome"] for m in cluster.move_log}
    assert outcomes[a] == "aborted: the request finished on the source"
    assert outcomes[b] == "aborted: the request was aborted"
    assert cluster.requests[a].status == "finished" and cluster.requests[b].status == "aborted"
    assert_clean(cluster)


def test_load_balancing_migration_moves_requests_to_a_free_instance(model, reference):
    """Llumnix's policy: with every request dispatched to instance 0 (a small pool, so it
    queues), the policy migrates running requests to the idle instance 1."""
    serve = dataclasses.replace(SERVE, num_pages=40)
    cfg = ClusterConfig(num_instances=2, migration=True, migration_interval_s=1e-9)
    cluster = Cluster.build(model, serve, cfg)
    cluster.dispatch.choose = lambda loads, pages, priority=0: 0
    ids = add_all(cluster, seed=3)
    outputs = run(cluster, ids)
    ref = [o.outputs for o in Engine(model, serve).generate(*make_requests(3))]
    assert outputs == ref
    assert cluster.summary(1.0)["migrations"] >= 1
    assert any(cluster.requests[i].instance == 1 for i in ids)
    assert_clean(cluster)


# -- faults ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "when", [pytest.param(1, marks=pytest.mark.slow), 3, pytest.param(6, marks=pytest.mark.slow)]
)
def test_a_killed_instance_loses_nothing(model, reference, when):
    cluster = build(model, num_instances=3)
    ids = add_all(cluster, seed=4)

    def kill(c, step):
        if step == when:
            c.kill(1)

    assert run(cluster, ids, kill) == reference(4)  # nothing lost, nothing twice
    assert cluster.dead == {1}
    assert any("instance 1 died" in e for e in cluster.events)
    assert "its capacity is removed" in cluster.events[-1]
    assert cluster.summary(1.0)["restarts"] >= 1
    assert_clean(cluster)


def test_a_killed_instance_is_replaced(model, reference):
    cluster = build(model, num_instances=2, on_death="replace")
    ids = add_all(cluster, seed=5)
    cluster.step()
    cluster.kill(0)
    assert run(cluster, ids) == reference(5)
    assert cluster.dead == set()
    assert any("replacement joined" in e for e in cluster.events)
    more = add_all(cluster, seed=5)  # the replacement serves new requests
    assert run(cluster, more) == reference(5)


def test_kill_during_handover_and_migration(model, reference):
    cluster = build(model, num_instances=3, roles=("prefill", "decode", "decode"), chunk_pages=1)
    ids = add_all(cluster, seed=6)
    cluster.step()  # first tokens: hand-overs begin, one page per step
    assert cluster.moves
    cluster.kill(1)
    assert run(cluster, ids) == reference(6)
    assert any(m["outcome"] == "aborted: the destination died" for m in cluster.move_log)
    assert_clean(cluster)


# -- bad input ---------------------------------------------------------------------------------


def test_bad_cluster_configs_are_clear_errors(model):
    with pytest.raises(ConfigError, match="3 instances x 3 devices need 9 devices but there are 8"):
        build(model, num_instances=3, devices_per_instance=3)
    with pytest.raises(ConfigError, match="devices_per_instance=3 does not divide the 8"):
        build(model, num_instances=2, devices_per_instance=3)
    with pytest.raises(ConfigError, match="roles has 1 entries for 2 instances"):
        ClusterConfig(num_instances=2, roles=("prefill",))
    with pytest.raises(ConfigError, match="roles: nothing can prefill"):
        ClusterConfig(num_instances=2, roles=("decode", "decode"))
    with pytest.raises(ConfigError, match="migration_max_moves must be >= 1"):
        ClusterConfig(migration_max_moves=0)
    with pytest.raises(ConfigError, match="backend must be one of"):
        ClusterConfig(backend="mpi")
    with pytest.raises(ConfigError, match="did you mean .num_instances."):
        ClusterConfig.from_dict({"num_instance": 2})


def test_unreachable_ray_address_is_a_quick_error():
    from mlx_sched.cluster import ray_backend

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ClusterConfig(backend="ray", ray_address=f"127.0.0.1:{port}", ray_timeout_s=2)
    with pytest.raises(ClusterError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}"):
        ray_backend._check_reachable(cfg.ray_address, cfg.ray_timeout_s)
    with pytest.raises(ClusterError, match="is not host:port"):
        ray_backend._check_reachable("nowhere", 1)


def test_bad_requests_and_migrations(model):
    cluster = build(model, num_instances=2)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        cluster.add_request([MC.vocab_size + 1])
    with pytest.raises(RequestError, match="exceeds the context"):
        cluster.add_request([1] * 100, SamplingParams(max_tokens=100))
    rid = cluster.add_request([1, 2, 3], SamplingParams(max_tokens=20))
    with pytest.raises(RequestError, match="already in use"):
        cluster.add_request([1], request_id=rid)
    cluster.step()
    here = cluster.requests[rid].instance
    with pytest.raises(ClusterError, match="already runs on instance"):
        cluster.migrate(rid, here)
    with pytest.raises(ClusterError, match="no instance 5"):
        cluster.migrate(rid, 5)
    cluster.kill(1 - here)
    cluster.step()  # the death is noticed when the instance is next called
    cluster.add_request([4, 5])
    with pytest.raises(ClusterError, match=f"instance {1 - here} is dead"):
        cluster.migrate(rid, 1 - here)
    with pytest.raises(RequestError, match="unknown request id"):
        cluster.abort("nope")
    while cluster.has_work():
        cluster.step()
    assert cluster.requests[rid].status == "finished"


# -- the engine's hand-over methods directly -------------------------------------------------


def test_engine_handoff_methods_and_their_refusals(model):
    src, dst = Engine(model, SERVE, warmup=False), Engine(model, SERVE, warmup=False)
    prompt, sp = list(range(1, 20)), SamplingParams(max_tokens=12, ignore_eos=True)
    ref = Engine(model, SERVE, warmup=False).generate([prompt], sp)[0].outputs
    rid = src.add_request(prompt, sp)
    src.step()
    assert src.movable(rid) is None
    pages = src.kv_pages(rid)
    assert pages == src.pool.pages_for(src.requests[rid].seqs[0].num_computed) > 0
    src.pause(rid)  # paused: kept pages, computes nothing
    assert not src.has_work() and src.pool.num_in_use == pages
    with pytest.raises(RequestError, match="is not running"):
        src.pause(rid)
    assert not dst.reserve_import(rid, SERVE.num_pages)  # all-or-nothing
    assert dst.reserved_pages(rid) == 0 and dst.pool.num_in_use == 0
    assert dst.reserve_import(rid, pages)
    dst.write_kv(rid, 0, *src.read_kv(rid, 0, pages))
    with pytest.raises(RequestError, match="cannot be written"):
        dst.write_kv(rid, pages, *src.read_kv(rid, 0, 1))
    state = src.export_request(rid)
    short = dataclasses.replace(state, num_computed=state.num_computed + 4 * SERVE.page_size)
    with pytest.raises(RequestError, match="pages were reserved"):
        dst.import_request(short)  # the reservation is freed with the refusal
    assert dst.pool.num_in_use == 0
    assert dst.reserve_import(rid, pages)
    dst.write_kv(rid, 0, *src.read_kv(rid, 0, pages))
    dst.import_request(state)
    src.detach(rid)
    assert rid not in src.requests and src.pool.num_in_use == 0
    while dst.has_work():
        dst.step()
    assert dst.requests[rid].outputs() == ref
    # n > 1 requests do not move; a paused request can be aborted
    two = src.add_request(prompt, SamplingParams(max_tokens=4, n=2))
    assert "n=2" in src.movable(two)
    with pytest.raises(RequestError, match="cannot move"):
        src.export_request(two)
    one = src.add_request(prompt, sp)
    src.step()
    src.pause(one)
    src.abort(one)
    assert one not in src.sched.paused
    while src.has_work():
        src.step()
    assert src.pool.num_in_use == 0
    src.pool.check()
