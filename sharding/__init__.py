"""Mesh construction and the logical-axis rules: the only package that knows mesh axis names."""

from sharding.distributed import initialize, is_primary
from sharding.mesh import MeshConfig, MeshError, make_mesh
from sharding.params import (
    logical_axes,
    optimizer_shardings,
    place,
    replicated,
    state_shardings,
)
from sharding.rules import MESH_AXES, RULES, constrain, logical_to_spec, named_sharding

__all__ = [
    "MESH_AXES",
    "RULES",
    "MeshConfig",
    "MeshError",
    "constrain",
    "initialize",
    "is_primary",
    "logical_axes",
    "logical_to_spec",
    "make_mesh",
    "named_sharding",
    "optimizer_shardings",
    "place",
    "replicated",
    "state_shardings",
]
