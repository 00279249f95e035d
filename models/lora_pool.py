"""S-LoRA's batched adapters: one base model, a pool of adapters, one adapter slot per token.

A pooled adapter on a projection holds every slot's A [S, in dims..., I] and B [S, I, out
dims...] (S slots, I the pool's largest rank) and its scale alpha / r [S]. Slot 0 is the
null slot: all zeros, so a token of slot 0 gets exactly no delta. An adapter of rank r < I
is zero-padded, which is exact: its extra columns of A and rows of B are zero. A token's
delta is (x @ A[s]) @ B[s] * scale[s] for its slot s: A, B and scale gathered by slot, then
two batched matmuls in the compute dtype with float32 accumulation (`layers.dot`). A mixed
serving step gathers once per segment (`SlotSegments`: a decode slot's tokens, a prefill
row), a decode slice once per token (each its own sequence).
Letters as in `models/__init__.py` (S here: adapter slots; I: the rank).

`attach_pool(model, targets, slots, max_rank)` gives a model without adapters pooled ones
(its weights are `PoolParam`s, so the serving engine takes them with the other params and
writes a slot in place); `read_adapter(source, specs)` reads one adapter, from a PEFT folder
or a model with an adapter, into host arrays of the pool's layout.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import lora, lora_peft
from models.layers import dot
from models.lora import RANK, LoraParam, split_eq
from models.lora_config import LoraConfig

Key = tuple[int, str]  # (layer, target)


class PoolParam(LoraParam):
    """A slot-stacked adapter weight of the serving pool (slot 0: zeros)."""


def _batched(eq: str) -> str:
    """`x,w->y` with the weight gathered per token: `x,tw->y` (t, the token letter)."""
    ins, out = eq.split("->")
    xs, ws = ins.split(",")
    return f"{xs},{xs[0]}{ws}->{out}"


@dataclasses.dataclass(frozen=True)
class SlotSegments:
    """A mixed serving step's adapter slots by segment, G = D + R of them: decode slot d's
    L consecutive tokens (the first D * L) use `dec_slot_D[d]`; prefill row r's tokens (the
    rest, gathered by `pre_index_RC`, padding = Tp) use `pre_slot_R[r]`. A and B are then
    gathered once per segment, not once per token."""

    dec_slot_D: jax.Array
    dec_width: int
    pre_slot_R: jax.Array | None = None
    pre_index_RC: jax.Array | None = None


def _segmented(eq: str) -> str:
    """`x,w->y` with a leading segment axis g on all three."""
    ins, out = eq.split("->")
    xs, ws = ins.split(",")
    return f"g{xs},g{ws}->g{out}"


def _delta_by(eqs, x, a, b, scale, dtype) -> jax.Array:
    """(x @ a) @ b * scale for weights gathered per token (eqs `_batched`) or per segment."""
    h = dot(eqs[0], x, a, dtype)
    y = dot(eqs[1], h, b, dtype)
    scale = scale.astype(jnp.float32).reshape(scale.shape + (1,) * (y.ndim - scale.ndim))
    return (y * scale).astype(dtype)


def pooled_delta(eq, x, a_S, b_S, scale_S, slots, dtype) -> jax.Array:
    """Each token's adapter delta on the projection `eq`, by its slot (0: exactly zero);
    `slots` is [T], a slot per token, or the step's `SlotSegments`."""
    eq_a, eq_b, _ = split_eq(eq)
    if not isinstance(slots, SlotSegments):
        eqs = (_batched(eq_a), _batched(eq_b))
        return _delta_by(eqs, x, a_S[slots], b_S[slots], scale_S[slots], dtype)
    eqs = (_segmented(eq_a), _segmented(eq_b))
    D, L = slots.dec_slot_D.shape[0], slots.dec_width
    parts = []
    if D:
        s = slots.dec_slot_D
        x_G = x[: D * L].reshape(D, L, *x.shape[1:])
        y = _delta_by(eqs, x_G, a_S[s], b_S[s], scale_S[s], dtype)
        parts.append(y.reshape(D * L, *y.shape[2:]))
    if slots.pre_index_RC is not None:
        s, idx_RC = slots.pre_slot_R, slots.pre_index_RC
        x_pre = x[D * L :]
        Tp = x_pre.shape[0]
        x_pad = jnp.concatenate([x_pre, jnp.zeros((1, *x.shape[1:]), x.dtype)])  # row Tp: 0
        y_RC = _delta_by(eqs, x_pad[idx_RC], a_S[s], b_S[s], scale_S[s], dtype)
        y_pre = jnp.zeros((Tp + 1, *y_RC.shape[2:]), y_RC.dtype)
        y_pre = y_pre.at[idx_RC.reshape(-1)].set(y_RC.reshape(-1, *y_RC.shape[2:]))
        parts.append(y_pre[:Tp])
    elif x.shape[0] > D * L:
        raise ValueError("SlotSegments: prefill tokens need pre_index_RC")
    return jnp.concatenate(parts) if len(parts) > 1 else parts[0]


class PooledLoRA(nnx.Module):
    """Every slot's adapter on the projection `eq` of the base weight `w`."""

    def __init__(self, eq: str, w: nnx.Param, slots: int, max_rank: int, dtype):
        self.eq, self.dtype = eq, dtype
        ab, ws = split_eq(eq)[2].split("->")
        dims = dict(zip(ws, w.shape, strict=True)) | {RANK: max_rank}
        axes = dict(zip(ws, w.get_metadata()["axes"], strict=True)) | {RANK: None}
        spec_a, spec_b = ab.split(",")
        shape = lambda s: (slots + 1, *(dims[c] for c in s))
        axes_of = lambda s: (None, *(axes[c] for c in s))
        self.a = PoolParam(jnp.zeros(shape(spec_a), w.dtype), axes=axes_of(spec_a))
        self.b = PoolParam(jnp.zeros(shape(spec_b), w.dtype), axes=axes_of(spec_b))
        self.scale = PoolParam(jnp.zeros((slots + 1,), jnp.float32), axes=(None,))

    def __call__(self, x: jax.Array, slots=None) -> jax.Array:
        if slots is None:
            raise ValueError("a pooled adapter needs the tokens' slots (the serving context's)")
        return pooled_delta(
            self.eq, x, self.a[...], self.b[...], self.scale[...], slots, self.dtype
        )


def attach_pool(model, targets: tuple[str, ...], slots: int, max_rank: int):
    """A copy of `model` (a Transformer without adapters; weights shared) with pooled adapters
    of `slots` slots (plus the null slot) and rank `max_rank` on `targets` of every layer."""
    if model.cfg.lora is not None:
        raise ValueError(
            "serve.lora: the model has its own adapter; serve its base (lora.base_model) and "
            "register the adapter, or merge it (lora.merge)"
        )
    graphdef, state = nnx.split(model)
    out = nnx.merge(graphdef, state)
    for block in out.layers:
        found = {"attn": {}, "mlp": {}}
        for target in targets:
            module = lora._module(block, target)
            if module is not None:
                attr, weight, eq = lora.PROJECTIONS[target]
                w = getattr(module, weight)
                found[attr][target] = PooledLoRA(eq, w, slots, max_rank, out.cfg.compute_dtype)
        for attr, by_target in found.items():
            if by_target:
                getattr(block, attr).lora = nnx.data(nnx.Dict(by_target))
    return out


def pool_specs(model) -> dict[Key, tuple[tuple[int, ...], tuple[int, ...]]]:
    """(layer, target) -> one adapter's A and B shapes in `model`'s pool, at rank 1."""
    out = {}
    for layer, target, _, ad in lora.adapters(model):
        if isinstance(ad, PooledLoRA):
            out[layer, target] = ((*ad.a.shape[1:-1], 1), (1, *ad.b.shape[2:]))
    return out


def _at_rank(shape: tuple[int, ...], rank: int, last: bool) -> tuple[int, ...]:
    return (*shape[:-1], rank) if last else (rank, *shape[1:])


def adapter_config(source) -> LoraConfig:
    """The LoraConfig of a PEFT folder (path), a model with an adapter, or an in-memory
    (LoraConfig or dict, {(layer, target): (A, B)})."""
    if isinstance(source, str | pathlib.Path):
        return lora_peft.read_adapter_config(source)
    if isinstance(source, tuple) and len(source) == 2:
        return LoraConfig.from_any(source[0])
    cfg = getattr(source, "cfg", None)
    if cfg is None or cfg.lora is None:
        raise ValueError(
            f"an adapter is a PEFT folder or a model with an adapter, got {type(source).__name__}"
        )
    return cfg.lora


def read_adapter(source, specs) -> tuple[LoraConfig, dict[Key, tuple[np.ndarray, np.ndarray]]]:
    """One adapter as (its config, {(layer, target): (A, B)} float32 host arrays of the pool's
    layout at the adapter's rank), from a PEFT folder (path), a model with an adapter, or an
    in-memory (config, {(layer, target): (A, B)}) as this returns.
    A ValueError (one line) when it does not fit the pool's base: a missing layer or target,
    another shape."""
    if isinstance(source, str | pathlib.Path):
        return _read_peft(pathlib.Path(source), specs)
    lcfg, out = adapter_config(source), {}
    if isinstance(source, tuple):
        for key, (a, b) in source[1].items():
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            _check_shape(tuple(key), specs, a.shape, b.shape, lcfg.rank)
            out[tuple(key)] = (a, b)
        return lcfg, out
    for layer, target, _, ad in lora.adapters(source):
        key = (layer, target)
        a = np.asarray(jnp.asarray(ad.a[...], jnp.float32))
        b = np.asarray(jnp.asarray(ad.b[...], jnp.float32))
        _check_shape(key, specs, a.shape, b.shape, lcfg.rank)
        out[key] = (a, b)
    return lcfg, out


def _check_shape(key: Key, specs, shape_a, shape_b, rank: int) -> None:
    if key not in specs:
        raise ValueError(f"layer {key[0]} has no pooled '{key[1]}' (another base model?)")
    spec_a, spec_b = specs[key]
    want_a, want_b = _at_rank(spec_a, rank, True), _at_rank(spec_b, rank, False)
    if tuple(shape_a) != want_a or tuple(shape_b) != want_b:
        raise ValueError(
            f"layer {key[0]} {key[1]}: A {tuple(shape_a)} and B {tuple(shape_b)}, the base needs "
            f"{want_a} and {want_b} (another base model?)"
        )


def _read_peft(path: pathlib.Path, specs):
    lcfg = lora_peft.read_adapter_config(path)
    tensors = lora_peft._read_tensors(path)
    prefix, out, unused = lora_peft.PREFIX, {}, set(tensors)
    for (layer, target), (spec_a, spec_b) in specs.items():
        if target not in lcfg.targets:
            continue
        _, module, others = lora_peft.HF_MODULES[target]
        names = [f"{prefix}{layer}.{m}" for m in (module, *others)]
        name = next((n for n in names if n + ".lora_A.weight" in tensors), names[0])
        r = lcfg.rank
        shape_a, shape_b = _at_rank(spec_a, r, True), _at_rank(spec_b, r, False)
        a = lora_peft._take(
            tensors, name + ".lora_A.weight", (r, int(np.prod(shape_a[:-1]))), unused
        )
        b = lora_peft._take(
            tensors, name + ".lora_B.weight", (int(np.prod(shape_b[1:])), r), unused
        )
        out[layer, target] = (a.T.reshape(shape_a), b.T.reshape(shape_b))
    if unused:
        raise ValueError(
            f"{path}: {len(unused)} tensors fit no pooled module, e.g. '{sorted(unused)[0]}' "
            "(another base model, or targets outside serve.lora.targets?)"
        )
    return lcfg, out


__all__ = [
    "PoolParam",
    "SlotSegments",
    "adapter_config",
    "PooledLoRA",
    "attach_pool",
    "pool_specs",
    "pooled_delta",
    "read_adapter",
]
