"""The device side of the adapter pool: writing one adapter into a slot of the runner's pooled
adapter weights (`models/lora_pool.py`) in place, one jitted program compiled at warm-up.

A load sends one flat float32 buffer (every pooled leaf's slot, A and B zero-padded to the
pool's rank) and the slot index: two host -> device transfers, whatever the model's depth.
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
from flax import nnx

from models.lora_pool import PoolParam


def _write_slot(shapes, leaves, slot, flat):
    out, off = [], 0
    for x, shape in zip(leaves, shapes, strict=True):
        n = math.prod(shape)
        v = flat[off : off + n].reshape(shape).astype(x.dtype)
        out.append(jax.lax.dynamic_update_index_in_dim(x, v, slot, 0))
        off += n
    return tuple(out)


def _value(v):
    return v.get_value() if isinstance(v, nnx.Variable) else v


class DeviceSlots:
    """Writes adapters into slots of `runner.params` (A and B zero-padded to the pool's rank)."""

    def __init__(self, runner):
        self.runner = runner
        flat = dict(nnx.to_flat_state(runner.params))
        self.paths = [p for p, v in flat.items() if isinstance(v, PoolParam)]
        leaves = [_value(flat[p]) for p in self.paths]
        self.shapes = tuple(tuple(x.shape[1:]) for x in leaves)
        sizes = [math.prod(s) for s in self.shapes]
        self.offsets = np.cumsum([0, *sizes]).tolist()
        self.itemsize = leaves[0].dtype.itemsize
        shard = dict(nnx.to_flat_state(runner.param_shardings))
        shardings = tuple(_value(shard[p]) for p in self.paths)
        fn = functools.partial(_write_slot, self.shapes)
        self._write = jax.jit(fn, out_shardings=shardings, donate_argnums=0)

    def write(self, slot: int, weights: dict, scale: float, rank: int) -> None:
        """Slot `slot` := the adapter `weights` ((layer, target) -> (A, B) at `rank`), scale."""
        r = self.runner
        buf = np.zeros(self.offsets[-1], np.float32)
        for i, path in enumerate(self.paths):
            layer, target, kind = path[1], path[-2], path[-1]
            if (layer, target) not in weights:
                continue  # zeros: no delta on this module
            v = buf[self.offsets[i] : self.offsets[i + 1]].reshape(self.shapes[i])
            a, b = weights[layer, target]
            if kind == "a":
                v[..., :rank] = a
            elif kind == "b":
                v[:rank] = b
            else:
                v[...] = scale
        flat = dict(nnx.to_flat_state(r.params))
        leaves = tuple(_value(flat[p]) for p in self.paths)
        slot_d, buf_d = jax.device_put((np.int32(slot), buf), r.repl)
        with r._counting(), jax.set_mesh(r.mesh):
            out = self._write(leaves, slot_d, buf_d)
        for path, x in zip(self.paths, out, strict=True):
            flat[path] = flat[path].replace(x)
        r.params = nnx.from_flat_state(flat)

    def warmup(self) -> None:
        """Compile the write (zeros into the null slot 0, which stays zero)."""
        self.write(0, {}, 0.0, 0)
