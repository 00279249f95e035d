"""Building a cluster's instances: in process on disjoint device subsets, or as Ray actors."""

from __future__ import annotations

import dataclasses
import time

from mlx_sched.cluster.backends import LocalInstance
from mlx_sched.cluster.config import ClusterConfig
from mlx_sched.cluster.instance import InstanceServer
from mlx_sched.serve.config import ServeConfig


def instance_serve(serve: ServeConfig) -> ServeConfig:
    """An instance's settings: KV transfer programs compiled at warm-up (moves compile
    nothing later)."""
    return dataclasses.replace(serve, kv_transfer=True)


def local_instance(model, serve: ServeConfig, mesh_cfg: dict, devices, name: str):
    import sharding
    from mlx_sched.serve.engine import Engine

    mesh = sharding.make_mesh(mesh_cfg or None, devices=devices)
    engine = Engine(model, instance_serve(serve), mesh=mesh, clock=time.time)
    return LocalInstance(InstanceServer(engine, name))


def build_cluster(model, serve: ServeConfig, cfg: ClusterConfig, mesh_cfg: dict):
    from mlx_sched.cluster.cluster import Cluster

    max_len = serve.max_len(model.cfg.max_seq_len)
    if cfg.backend == "ray":
        from mlx_sched.cluster import ray_backend

        instances, replace = ray_backend.start(model, serve, cfg, mesh_cfg)
    else:
        import jax

        devices = jax.devices()
        groups = cfg.device_groups(len(devices))

        def make(i: int):
            return local_instance(
                model, serve, mesh_cfg, [devices[j] for j in groups[i]], f"instance-{i}"
            )

        instances, replace = [make(i) for i in range(cfg.num_instances)], make
    return Cluster(instances, cfg, serve, model.cfg.vocab_size, max_len, replace=replace)
