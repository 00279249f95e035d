"""Place a model's parameters and optimizer state on a mesh by the rules table."""

from __future__ import annotations

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sharding.rules import named_sharding


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def logical_axes(state: nnx.State) -> nnx.State:
    """The `axes` metadata of every parameter, as a State of tuples."""
    return jax.tree.map(lambda v: v.replace(v.get_metadata()["axes"]), state, is_leaf=_is_var)


def state_shardings(mesh: Mesh, state: nnx.State) -> nnx.State:
    """NamedShardings for a (possibly abstract) param State, one per leaf, from its axes."""

    def one(v):
        axes = v.get_metadata().get("axes")
        if axes is None:
            return v.replace(NamedSharding(mesh, P()))
        return v.replace(named_sharding(mesh, axes, v.get_value().shape))

    return jax.tree.map(one, state, is_leaf=_is_var)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def optimizer_shardings(tx: optax.GradientTransformation, abstract_params, param_shardings, mesh):
    """Shardings for `tx.init(params)`: param-shaped leaves follow their param; others replicate."""
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    return optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract_opt,
        param_shardings,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=_is_var,
    )


def place(tree, shardings):
    """device_put every leaf of `tree` with the matching sharding."""
    return jax.device_put(tree, shardings)
