"""S-LoRA's batched adapters: one base model, many adapters, one adapter slot per token.

Adapters live in the KV cache (S-LoRA's unified paging): a resident adapter holds pages of
the engine's page pool, and its weights are written into those pages (`pack_adapter`, laid
out as `PoolLayout` says), so adapters and long contexts trade the same memory. Each serving
step reads every slot's A [S, in dims..., I] and B [S, I, out dims...] out of its pages
(`pool_weights`; I the pool's largest rank, rows past a slot's own rank masked to zero, which
is exact) together with a scale alpha / r per slot. Slot 0 is the null slot: rank 0 and scale
0, so a token of slot 0 gets exactly no delta. A token's delta is (x @ A[s]) @ B[s] * scale[s]
for its slot s: two batched matmuls in the compute dtype with float32 accumulation
(`layers.dot`). A mixed serving step gathers once per segment (`SlotSegments`: a decode
slot's tokens, a prefill row), a decode slice once per token (each its own sequence).
Letters as in `models/__init__.py` (S here: adapter slots; I: the rank).

`attach_pool(model, targets, max_rank, page, packed)` gives a model without adapters pooled
ones (modules without parameters: their weights come with the step, `PoolStep`);
`read_adapter(source, specs)` reads one adapter, from a PEFT folder or a model with an
adapter, into host arrays of the pool's layout.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import lora, lora_peft
from models.layers import dot
from models.lora import split_eq
from models.lora_config import LoraConfig

Key = tuple[int, str]  # (layer, target)


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


@dataclasses.dataclass(frozen=True)
class PoolLayout:
    """Where adapters live in the KV cache (S-LoRA's unified paging: a page holds either KV or
    adapter weights). A KV page of one layer is its K and V blocks, [Z, K, X] words each (a
    `bfloat16` cache packs two values in a uint32 word); an adapter's weights of one layer are
    rank rows, row j = every pooled module's A[..., j] then B[j] flattened, laid end to end in
    its pages of that layer (the same page ids in every layer). An adapter of rank r takes
    `pages(r)` pages; a step reads `pages(max_rank)` per slot and masks rows >= r.
    Static (hashable) so the serving steps see it through the model's graph."""

    max_rank: int
    page: tuple[int, int, int]  # Z, K, X: one layer's K (or V) block of a page, in words
    packed: bool  # bfloat16 pairs in uint32 words
    rows: tuple[tuple[int, int], ...]  # (layer, values per rank row)
    modules: tuple[tuple[int, str, int, tuple, tuple], ...]  # layer, target, offset, in, out
    n_layers: int  # the model's (layers without pooled modules hold zeros)

    @property
    def page_values(self) -> int:
        """Values one page holds in one layer (K and V)."""
        return 2 * math.prod(self.page) * (2 if self.packed else 1)

    def pages(self, rank: int) -> int:
        """Pages an adapter of rank `rank` takes (the most any layer needs)."""
        return max((-(-rank * row // self.page_values) for _, row in self.rows), default=0)

    @property
    def max_pages(self) -> int:
        return self.pages(self.max_rank)


@dataclasses.dataclass(frozen=True)
class PoolStep:
    """A serving step's adapters: the tokens' slots ([T] per token, or `SlotSegments`), every
    slot's A and B by (layer, target) read from the KV pages (`pool_weights`), its scale."""

    slots: object
    weights: dict
    scale_S: jax.Array


class PooledLoRA(nnx.Module):
    """Every slot's adapter on the projection `eq` at (layer, target): its weights are the
    step's (`PoolStep`), read from the adapters' KV pages, not parameters."""

    def __init__(self, eq: str, key: Key, dtype):
        self.eq, self.key, self.dtype = eq, key, dtype

    def __call__(self, x: jax.Array, step: PoolStep | None = None) -> jax.Array:
        if step is None:
            raise ValueError("a pooled adapter needs the step's adapters (the serving context's)")
        a_S, b_S = step.weights[self.key]
        return pooled_delta(self.eq, x, a_S, b_S, step.scale_S, step.slots, self.dtype)


def attach_pool(model, targets: tuple[str, ...], max_rank: int, page, packed: bool):
    """A copy of `model` (a Transformer without adapters; weights shared) with pooled adapters
    of rank <= `max_rank` on `targets` of every layer, stored in KV pages of `page` = (Z, K,
    X) words per layer's K or V block (`packed`: bfloat16 pairs) -> (model, its PoolLayout)."""
    if model.cfg.lora is not None:
        raise ValueError(
            "serve.lora: the model has its own adapter; serve its base (lora.base_model) and "
            "register the adapter, or merge it (lora.merge)"
        )
    graphdef, state = nnx.split(model)
    out = nnx.merge(graphdef, state)
    rows, modules = [], []
    for block in out.layers:
        found, offset = {"attn": {}, "mlp": {}}, 0
        for target in targets:
            module = lora._module(block, target)
            if module is None:
                continue
            attr, weight, eq = lora.PROJECTIONS[target]
            ab, ws = split_eq(eq)[2].split("->")
            dims = dict(zip(ws, getattr(module, weight).shape, strict=True))
            spec_a, spec_b = ab.split(",")
            in_dims = tuple(dims[c] for c in spec_a[:-1])  # A: [in..., I]
            out_dims = tuple(dims[c] for c in spec_b[1:])  # B: [I, out...]
            key = (block.layer, target)
            modules.append((*key, offset, in_dims, out_dims))
            offset += math.prod(in_dims) + math.prod(out_dims)
            found[attr][target] = PooledLoRA(eq, key, out.cfg.compute_dtype)
        for attr, by_target in found.items():
            if by_target:
                getattr(block, attr).lora = nnx.data(nnx.Dict(by_target))
        if offset:
            rows.append((block.layer, offset))
    layout = PoolLayout(
        max_rank, tuple(page), bool(packed), tuple(rows), tuple(modules), len(out.layers)
    )
    out.adapter_layout = layout  # static: the serving steps read it from the model's graph
    return out, layout


def pool_specs(layout: PoolLayout) -> dict[Key, tuple[tuple[int, ...], tuple[int, ...]]]:
    """(layer, target) -> one adapter's A and B shapes in the pool, at rank 1."""
    return {(l, t): ((*i, 1), (1, *o)) for l, t, _, i, o in layout.modules}


def pack_adapter(layout: PoolLayout, weights: dict, rank: int, dtype) -> tuple:
    """One adapter's pages: ((layer, target) -> (A, B) at `rank`) as K and V blocks
    [N, max_pages, Z, K, X] of the cache's storage `dtype` (N: the model's layers; pages past
    `pages(rank)` and layers without pooled modules are zeros)."""
    P, (Z, K, X) = layout.max_pages, layout.page
    k = np.zeros((layout.n_layers, P, Z, K, X), dtype)
    v = np.zeros_like(k)
    row_of = dict(layout.rows)
    for layer, row in row_of.items():
        flat = np.zeros(P * layout.page_values, np.float32)
        rows = flat[: layout.max_rank * row].reshape(layout.max_rank, row)
        for l_, target, off, in_dims, out_dims in layout.modules:
            if l_ != layer or (layer, target) not in weights:
                continue
            a, b = weights[layer, target]
            n_in = math.prod(in_dims)
            rows[:rank, off : off + n_in] = np.asarray(a).reshape(n_in, rank).T
            rows[:rank, off + n_in : off + n_in + math.prod(out_dims)] = np.reshape(b, (rank, -1))
        if layout.packed:  # bfloat16 values, element 2j in the low half of word j
            bits = flat.astype(jnp.bfloat16).view(np.uint16).astype(np.uint32)
            flat = bits[0::2] | (bits[1::2] << 16)
        words = flat.astype(dtype, copy=False).reshape(P, 2, Z, K, X)
        k[layer], v[layer] = words[:, 0], words[:, 1]
    return k, v


def step_adapters(model, k, v, b: dict, slots) -> PoolStep | None:
    """A serving step's `PoolStep` when `model` has a pool (`attach_pool`) and the step's
    bundle `b` its tables (`ad_pages`, `ad_rank`, `ad_scale`); else None."""
    layout = getattr(model, "adapter_layout", None)
    if layout is None or "ad_pages" not in b:
        return None
    dtype = model.cfg.compute_dtype
    weights = pool_weights(layout, k, v, b["ad_pages"], b["ad_rank"], dtype)
    return PoolStep(slots, weights, b["ad_scale"])


def pool_weights(layout: PoolLayout, k, v, pages_SP, rank_S, dtype) -> dict:
    """Every slot's A [S, in..., I] and B [S, I, out...] by (layer, target), read from its
    pages of the KV cache (`pages_SP`, of `pack_adapter`'s layout); rows at or past a slot's
    rank are zeros (`rank_S` 0: the slot adds nothing, whatever its pages hold)."""
    S, I = pages_SP.shape[0], layout.max_rank
    keep_SI = jnp.arange(I)[None, :] < rank_S[:, None]
    out = {}
    for layer, row in layout.rows:
        words = jnp.stack([k[layer][pages_SP], v[layer][pages_SP]], axis=2).reshape(S, -1)
        if layout.packed:
            low = jax.lax.bitcast_convert_type(words << 16, jnp.float32)
            high = jax.lax.bitcast_convert_type(words & jnp.uint32(0xFFFF0000), jnp.float32)
            values = jnp.stack([low, high], axis=-1).reshape(S, -1)
        else:
            values = words.astype(jnp.float32)
        rows_SIR = values[:, : I * row].reshape(S, I, row)
        rows_SIR = jnp.where(keep_SI[..., None], rows_SIR, 0.0).astype(dtype)
        for l_, target, off, in_dims, out_dims in layout.modules:
            if l_ != layer:
                continue
            n_in = math.prod(in_dims)
            a = jnp.moveaxis(rows_SIR[..., off : off + n_in].reshape(S, I, *in_dims), 1, -1)
            b = rows_SIR[..., off + n_in : off + n_in + math.prod(out_dims)]
            out[layer, target] = (a, b.reshape(S, I, *out_dims))
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
    "PoolLayout",
    "PoolStep",
    "PooledLoRA",
    "SlotSegments",
    "adapter_config",
    "attach_pool",
    "pack_adapter",
    "pool_specs",
    "pool_weights",
    "step_adapters",
    "pooled_delta",
    "read_adapter",
]
