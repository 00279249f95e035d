"""The Ray backend: each instance an actor in its own process, holding its own engine.

`ray.init()` starts a local Ray cluster by itself; `ClusterConfig.ray_address` joins an
existing (multi-host) one, after checking within `ray_timeout_s` that it answers, so an
unreachable address is a clear error, not a hang. The model reaches the actors as its
config and parameters, put once in Ray's object store. KV chunks of a move go from one
actor to another through the object store: the source's `read_kv` result is passed,
unresolved, to the destination's `write_kv`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import socket
import time
import urllib.parse

from mlx_sched.cluster.backends import ClusterError, Done, InstanceDead
from mlx_sched.cluster.config import ClusterConfig
from mlx_sched.cluster.instance import InstanceServer
from mlx_sched.serve.config import ServeConfig

ROOT = pathlib.Path(__file__).resolve().parents[2]  # where mlx_sched, models, sharding live


class ActorServer(InstanceServer):
    """The body of a Ray actor: builds its model and engine in its own process."""

    def __init__(self, name: str, spec: dict, serve: dict, mesh_cfg: dict, devices: int):
        import jax
        from flax import nnx

        import sharding
        from mlx_sched.cluster.build import instance_serve
        from mlx_sched.serve.engine import Engine
        from models import ModelConfig, Transformer

        model = Transformer(ModelConfig.from_dict(spec["config"]), nnx.Rngs(0))
        state = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(state, spec["params"])
        nnx.update(model, state)
        mesh = sharding.make_mesh(mesh_cfg or None, devices=jax.devices()[:devices])
        engine = Engine(model, instance_serve(ServeConfig.from_dict(serve)), mesh, time.time)
        super().__init__(engine, name)


def _check_reachable(address: str, timeout_s: float) -> None:
    """A ClusterError unless something answers at the Ray address within timeout_s."""
    if address in ("", "auto", "local"):
        return
    parsed = urllib.parse.urlsplit(address if "://" in address else f"ray://{address}")
    host, port = parsed.hostname, parsed.port
    if host is None or port is None:
        raise ClusterError(f"cluster.ray_address {address!r} is not host:port")
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address} within {timeout_s:.0f} s: {e}"
        ) from None


def init(cfg: ClusterConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    _check_reachable(cfg.ray_address, cfg.ray_timeout_s)
    kwargs = {"include_dashboard": False, "log_to_driver": False}
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, **kwargs)
    else:
        ray.init(num_cpus=max(2, os.cpu_count() or 1), **kwargs)


def model_spec(model) -> dict:
    import jax
    from flax import nnx

    params = jax.device_get(nnx.state(model, nnx.Param).to_pure_dict())
    return {"config": model.cfg.to_dict(), "params": params}


class RayInstance:
    """An instance in a Ray actor; `call` returns an ObjectRef."""

    backend = "ray"

    def __init__(self, actor, name: str):
        self.actor, self.name = actor, name
        self._ready_ref = actor.load.remote()

    @classmethod
    def start(cls, i: int, spec, serve: ServeConfig, cfg: ClusterConfig, mesh_cfg: dict):
        import dataclasses

        import ray

        env = {
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={cfg.devices_per_instance}",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        for key in ("JAX_PLATFORMS", "MLX_SCHED_KERNEL_CACHE", "JAX_COMPILATION_CACHE_DIR"):
            if key in os.environ:
                env[key] = os.environ[key]
        remote = ray.remote(ActorServer).options(
            num_cpus=0, runtime_env={"env_vars": env}, name=None, max_restarts=0
        )
        name = f"instance-{i}"
        serve_dict = dataclasses.asdict(serve)
        actor = remote.remote(name, spec, serve_dict, mesh_cfg, cfg.devices_per_instance)
        return cls(actor, name)

    def call(self, method: str, *args):
        args = tuple(a.value if isinstance(a, Done) else a for a in args)
        return getattr(self.actor, method).remote(*args)

    def kill(self) -> None:
        import ray

        ray.kill(self.actor, no_restart=True)

    def ready(self):
        """None while the actor is still starting; then its load, or the error it died of."""
        import ray

        done, _ = ray.wait([self._ready_ref], timeout=0)
        if not done:
            return None
        (out,) = gather([self._ready_ref])
        return out

    def close(self) -> None:
        import ray

        with contextlib.suppress(Exception):  # already gone
            ray.kill(self.actor, no_restart=True)


def start(model, serve: ServeConfig, cfg: ClusterConfig, mesh_cfg: dict):
    """Start the actors (in parallel) and wait until each has warmed up."""
    import ray

    init(cfg)
    t0 = time.perf_counter()
    spec = ray.put(model_spec(model))
    instances = [RayInstance.start(i, spec, serve, cfg, mesh_cfg) for i in range(cfg.num_instances)]
    for inst, ready in zip(instances, gather([i._ready_ref for i in instances]), strict=True):
        if isinstance(ready, BaseException):
            raise ClusterError(f"{inst.name} failed to start: {ready}")
    logging.info("%d Ray actors ready in %.1f s", len(instances), time.perf_counter() - t0)

    def replace(i: int):
        return RayInstance.start(i, spec, serve, cfg, mesh_cfg)

    return instances, replace


def gather(futures: list) -> list:
    """Values of a mix of ObjectRefs and in-process futures; a dead actor's calls give
    InstanceDead, a failed call its exception."""
    import ray

    refs = [f for f in futures if not isinstance(f, Done)]
    if refs:
        ray.wait(refs, num_returns=len(refs))
    out = []
    for f in futures:
        if isinstance(f, Done):
            out.append(f.error if f.error is not None else f.value)
            continue
        try:
            out.append(ray.get(f))
        except ray.exceptions.RayActorError as e:
            out.append(InstanceDead(str(e).splitlines()[0]))
        except ray.exceptions.RayTaskError as e:
            out.append(e.as_instanceof_cause())
        except Exception as e:
            out.append(e)
    return out
