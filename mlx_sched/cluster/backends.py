"""How the global scheduler reaches an instance: `call(method, *args)` returns a future,
`gather(futures)` waits for them. In process, a call runs at once and its future holds the
result; with Ray (`ray_backend`), it is an actor method call and its future an ObjectRef,
which can also be passed as an argument to another instance's call (a KV chunk goes from
one actor to another through Ray's object store, not through the driver).

A dead instance (killed, or its actor gone) raises `InstanceDead` from `gather`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mlx_sched.cluster.instance import InstanceServer


class InstanceDead(RuntimeError):
    """The instance is gone; its requests must be recovered elsewhere."""


class ClusterError(ValueError):
    """A cluster cannot be built or asked for this; the message says why."""


@dataclasses.dataclass
class Done:
    """The future of an in-process call: its value, or the exception it raised."""

    value: Any = None
    error: BaseException | None = None


class LocalInstance:
    """An instance in this process (its engine on a sub-mesh of this process's devices)."""

    backend = "local"

    def __init__(self, server: InstanceServer):
        self.server = server
        self.name = server.name
        self.dead = False

    def call(self, method: str, *args) -> Done:
        if self.dead:
            return Done(error=InstanceDead(f"{self.name} is dead"))
        if args:
            args = tuple(a.value if isinstance(a, Done) else a for a in args)
            if any(isinstance(a, Done) and a.error for a in args):
                return Done(error=next(a.error for a in args if isinstance(a, Done) and a.error))
        try:
            return Done(getattr(self.server, method)(*args))
        except Exception as e:  # delivered by gather, as a remote call's would be
            return Done(error=e)

    def kill(self) -> None:
        """Mark the instance dead (fault injection): every later call fails."""
        self.dead = True

    def ready(self):
        """A replacement built in process is ready at once: its load."""
        return InstanceDead(f"{self.name} is dead") if self.dead else self.server.load()


def gather(futures: list) -> list:
    """Each future's value, or the exception it raised (an `InstanceDead` for a dead
    instance); never raises itself."""
    ray_refs = [f for f in futures if not isinstance(f, Done)]
    if ray_refs:
        from mlx_sched.cluster import ray_backend

        return ray_backend.gather(futures)
    return [f.error if f.error is not None else f.value for f in futures]


def get(future):
    """One future's value; raises what the call raised."""
    (out,) = gather([future])
    if isinstance(out, BaseException):
        raise out
    return out
