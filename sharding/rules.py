"""The one logical-axis rules table, and helpers that apply it.

Model code names logical axes ("embed", "mlp", "act_batch", ...); this file
alone maps them to mesh axes. Parameters use plain names, activations use
names prefixed `act_`, so that FSDP can shard a weight's embed dimension
without sharding every activation's.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical name -> mesh axes it may be sharded over, in order.
RULES: dict[str, tuple[str, ...]] = {
    # parameters
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "expert": ("expert",),
    "norm": (),
    # activations
    "act_batch": ("data", "fsdp", "expert"),
    "act_length": (),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
    "act_expert": ("expert",),
    "act_group": ("data", "fsdp", "expert"),
    # paged KV cache [layers, pages, page_size, kv_heads, head_dim]
    "cache_layers": (),
    "cache_pages": (),
    "cache_page": (),
}

LogicalAxes = Sequence[str | None]


def mesh_axes_for(name: str | None, mesh_shape: dict[str, int]) -> tuple[str, ...]:
    """Mesh axes a logical name maps to on this mesh (absent or size-1 axes dropped)."""
    if name is None:
        return ()
    if name not in RULES:
        raise KeyError(f"logical axis '{name}' has no rule in sharding.rules.RULES")
    return tuple(a for a in RULES[name] if mesh_shape.get(a, 1) > 1)


def logical_to_spec(
    names: LogicalAxes, mesh_shape: dict[str, int], shape: Sequence[int] | None = None
) -> P:
    """PartitionSpec for logical names; with `shape`, axes that don't divide a dim are dropped.

    A mesh axis is used at most once per spec (the first dimension that asks wins).
    """
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        axes = []
        size = 1
        for a in mesh_axes_for(name, mesh_shape):
            if a in used:
                continue
            if shape is not None and shape[i] % (size * mesh_shape[a]) != 0:
                continue
            axes.append(a)
            size *= mesh_shape[a]
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*out)


def named_sharding(mesh: Mesh, names: LogicalAxes, shape: Sequence[int] | None = None):
    return NamedSharding(mesh, logical_to_spec(names, dict(mesh.shape), shape))


def constrain(x: jax.Array, names: LogicalAxes) -> jax.Array:
    """Sharding constraint by logical names under the ambient mesh; a no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"{len(names)} logical names {tuple(names)} for a rank-{x.ndim} array")
    spec = logical_to_spec(names, dict(mesh.shape), x.shape)
    return jax.lax.with_sharding_constraint(x, spec)
