"""The Ray backend: each instance an actor in its own process (a local Ray cluster started
by ray.init()). The same cluster code as in process: outputs equal one engine's, a
migration's KV goes actor to actor through the object store, a killed actor loses
nothing."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from tests_cluster_common import SERVE, make_requests, model_for_tests  # noqa: E402

from mlx_sched.cluster import Cluster, ClusterConfig  # noqa: E402
from mlx_sched.serve.engine import Engine  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_session():
    import ray

    yield
    ray.shutdown()


def test_ray_cluster_migrates_hands_over_and_survives_a_killed_actor(ray_session):
    model = model_for_tests()
    prompts, params = make_requests(0, 8, 3)
    ref = [o.outputs for o in Engine(model, SERVE).generate(prompts, params)]
    cfg = ClusterConfig(
        num_instances=3, roles=("prefill", "decode", "decode"), backend="ray", chunk_pages=2
    )
    cluster = Cluster.build(model, SERVE, cfg)
    try:
        assert [o.outputs for o in cluster.generate(prompts, params)] == ref
        s = cluster.summary(1.0)
        assert s["handovers"] == sum(p.n == 1 for p in params) and s["kv_bytes_moved"] > 0
        ids = [cluster.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
        cluster.step()
        cluster.step()
        moved = [
            i
            for i in ids
            if cluster.requests[i].instance != 0
            and not cluster.requests[i].finished
            and i not in cluster.moves
        ]
        for rid in moved[:2]:  # decode instance to decode instance
            cluster.migrate(rid, 3 - cluster.requests[rid].instance)
        cluster.step()
        cluster.kill(1)
        while cluster.has_work():
            cluster.step()
        assert [cluster.requests[i].outputs for i in ids] == ref
        assert 1 in cluster.dead and any("instance 1 died" in e for e in cluster.events)
        assert cluster.summary(1.0)["compiles_after_warmup"] == [0, 0, 0]
        cluster.check()
    finally:
        cluster.shutdown()
