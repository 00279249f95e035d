"""The device side of the adapter pool: writing one adapter into a slot of the runner's pooled
adapter weights (`models/lora_pool.py`) in place, one jitted program compiled at warm-up."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from models.lora_pool import PoolParam


def _write_slot(leaves, slot, values):
    return tuple(
        jax.lax.dynamic_update_index_in_dim(x, v.astype(x.dtype), slot, 0)
        for x, v in zip(leaves, values, strict=True)
    )


def _value(v):
    return v.get_value() if isinstance(v, nnx.Variable) else v


class DeviceSlots:
    """Writes adapters into slots of `runner.params` (A and B zero-padded to the pool's rank)."""

    def __init__(self, runner):
        self.runner = runner
        flat = dict(nnx.to_flat_state(runner.params))
        self.paths = [p for p, v in flat.items() if isinstance(v, PoolParam)]
        shard = dict(nnx.to_flat_state(runner.param_shardings))
        shardings = tuple(_value(shard[p]) for p in self.paths)
        self.itemsize = _value(flat[self.paths[0]]).dtype.itemsize
        self._write = jax.jit(_write_slot, out_shardings=shardings, donate_argnums=0)

    def write(self, slot: int, weights: dict, scale: float, rank: int) -> None:
        """Slot `slot` := the adapter `weights` ((layer, target) -> (A, B) at `rank`), scale."""
        r = self.runner
        flat = dict(nnx.to_flat_state(r.params))
        values = []
        for path in self.paths:
            leaf = _value(flat[path])
            layer, target, kind = path[1], path[-2], path[-1]
            v = np.zeros(leaf.shape[1:], np.float32)
            if (layer, target) in weights:
                a, b = weights[layer, target]
                if kind == "a":
                    v[..., :rank] = a
                elif kind == "b":
                    v[:rank] = b
                else:
                    v[...] = scale
            values.append(v.astype(leaf.dtype))
        leaves = tuple(_value(flat[p]) for p in self.paths)
        slot_d, values_d = jax.device_put((np.int32(slot), tuple(values)), r.repl)
        with r._counting(), jax.set_mesh(r.mesh):
            out = self._write(leaves, slot_d, values_d)
        for path, x in zip(self.paths, out, strict=True):
            flat[path] = flat[path].replace(x)
        r.params = nnx.from_flat_state(flat)

    def warmup(self) -> None:
        """Compile the write (zeros into the null slot 0, which stays zero)."""
        self.write(0, {}, 0.0, 0)
