"""Device meshes from a config of axis sizes, on one process or many."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import AxisType, Mesh

from sharding.rules import MESH_AXES


class MeshError(ValueError):
    """The requested mesh does not fit the devices; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the (data, fsdp, expert, tensor) axes; one size may be -1 (the rest)."""

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MeshConfig:
        unknown = set(d) - set(MESH_AXES)
        if unknown:
            raise MeshError(f"unknown mesh axis {sorted(unknown)}; axes are {MESH_AXES}")
        return cls(**dict(d))

    def resolve(self, n_devices: int) -> dict[str, int]:
        """Concrete axis sizes for n devices; -1 takes whatever divides the rest."""
        sizes = {a: getattr(self, a) for a in MESH_AXES}
        bad = [a for a, s in sizes.items() if s == 0 or s < -1]
        if bad:
            raise MeshError(f"mesh axis sizes must be >= 1 or -1, got {sizes}")
        free = [a for a, s in sizes.items() if s == -1]
        if len(free) > 1:
            raise MeshError(f"at most one mesh axis may be -1, got {free}")
        fixed = math.prod(s for s in sizes.values() if s != -1)
        if free:
            if n_devices % fixed:
                raise MeshError(
                    f"mesh {sizes} needs a multiple of {fixed} devices but there are {n_devices}; "
                    "change the mesh sizes so their product divides the device count"
                )
            sizes[free[0]] = n_devices // fixed
        elif fixed != n_devices:
            raise MeshError(
                f"mesh {sizes} uses {fixed} devices but there are {n_devices}; "
                "make the product of the axis sizes equal the device count (or set one to -1)"
            )
        return sizes


def make_mesh(config: MeshConfig | Mapping[str, int] | None = None, devices=None) -> Mesh:
    """A mesh with axes (data, fsdp, expert, tensor) over all (global) devices."""
    if config is None:
        config = MeshConfig()
    elif not isinstance(config, MeshConfig):
        config = MeshConfig.from_dict(config)
    devices = jax.devices() if devices is None else list(devices)
    sizes = config.resolve(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 4, devices=devices)
