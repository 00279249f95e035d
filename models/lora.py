"""LoRA: low-rank adapters on the attention and MLP projections and the MoE router.

An adapter on a projection y = x W adds `delta(x) = (x @ A) @ B * alpha / r`:
A [in dims..., I] starts kaiming-uniform and B [I, out dims...] at zero (as PEFT
initialises them), so a fresh adapter leaves the model's outputs unchanged.
Letters as in `models/__init__.py`, plus I, the adapter rank (LoRA's r).

Adapter weights are `LoraParam`s, an `nnx.Param` subclass: the serving engine
(which takes every `nnx.Param`) runs them unmerged, and `nnx.state(model,
LoraParam)` / `nnx.split(model, LoraParam, nnx.Param)` separate them from the
base for training. `Transformer(cfg)` with `cfg.lora` set builds them after
every base weight, so the base is the same as without adapters for one seed.
A module's adapters sit in its `lora` attribute (an `nnx.Dict` by target name,
None without any): a model without adapters has the same parameters and runs
the same computation as one built before LoRA existed.

The router's adapter is folded into the (small, float32) router weight at
every call (`W + scale * A @ B`) rather than run as two matmuls: the same
function of x, and it passes unchanged into the expert-parallel shard_map.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import dot
from models.lora_config import ATTENTION_TARGETS, TARGETS, LoraConfig

__all__ = [
    "TARGETS",
    "LoRA",
    "LoraConfig",
    "LoraParam",
    "add_adapter",
    "adapters",
    "attach",
    "base_model",
    "delta",
    "merge",
    "split_eq",
]

RANK = "i"  # the rank's letter in the adapter's einsums

# target -> (module attribute of a Block, weight attribute, the projection's einsum)
PROJECTIONS = {
    "q_proj": ("attn", "wq", "td,dhx->thx"),
    "k_proj": ("attn", "wk", "td,dkx->tkx"),
    "v_proj": ("attn", "wv", "td,dkx->tkx"),
    "o_proj": ("attn", "wo", "thx,hxd->td"),
    "gate_proj": ("mlp", "w_gate", "td,df->tf"),
    "up_proj": ("mlp", "w_up", "td,df->tf"),
    "down_proj": ("mlp", "w_down", "tf,fd->td"),
    "router": ("mlp", "router", "td,de->te"),
}


class LoraParam(nnx.Param):
    """An adapter weight (A or B); an nnx.Param, so filters by nnx.Param include it."""


def split_eq(eq: str) -> tuple[str, str, str]:
    """A projection's einsum `x,w->y` as the adapter's three: `x,A->h`, `h,B->y` and the
    merged update `A,B->w` (I, the rank, is the new letter)."""
    ins, out = eq.replace(" ", "").split("->")
    xs, ws = ins.split(",")
    if RANK in eq:
        raise ValueError(f"einsum '{eq}' already uses the rank letter '{RANK}'")
    contracted = "".join(c for c in xs if c in ws and c not in out)
    rows = "".join(c for c in xs if c not in contracted)
    cols = "".join(c for c in ws if c in out)
    a, b = contracted + RANK, RANK + cols
    return f"{xs},{a}->{rows}{RANK}", f"{rows}{RANK},{b}->{out}", f"{a},{b}->{ws}"


def delta(eq: str, x: jax.Array, a: jax.Array, b: jax.Array, scale: float, dtype) -> jax.Array:
    """The adapter's addition to the projection `eq` of x: (x @ A) @ B * scale, both matmuls
    in `dtype` with float32 accumulation (`models.layers.dot`).

    One adapter for every token; S-LoRA serving gathers A and B per token (by adapter slot)
    and contracts them the same way (`models/lora_pool.py`).
    """
    eq_a, eq_b, _ = split_eq(eq)
    h = dot(eq_a, x, a, dtype)
    return (dot(eq_b, h, b, dtype) * scale).astype(dtype)


class LoRA(nnx.Module):
    """One adapter on the projection `eq` of the base weight `w` (an nnx.Param with `axes`):
    A and B are kept in w's dtype, the delta is computed in `dtype`."""

    def __init__(self, eq: str, w: nnx.Param, lcfg: LoraConfig, dtype, rngs: nnx.Rngs):
        self.eq, self.scale, self.dtype = eq, lcfg.scale, dtype
        ab, ws = split_eq(eq)[2].split("->")
        dims = dict(zip(ws, w.shape, strict=True)) | {RANK: lcfg.rank}
        axes = dict(zip(ws, w.get_metadata()["axes"], strict=True)) | {RANK: None}
        shape_a, shape_b = (tuple(dims[c] for c in s) for s in ab.split(","))
        axes_a, axes_b = (tuple(axes[c] for c in s) for s in ab.split(","))
        # kaiming_uniform(a=sqrt(5)) as PEFT (and torch.nn.Linear): U(-1/sqrt(fan_in), +...)
        bound = 1.0 / math.sqrt(math.prod(shape_a[:-1]))
        a = jax.random.uniform(rngs.params(), shape_a, jnp.float32, -bound, bound)
        self.a = LoraParam(a.astype(w.dtype), axes=axes_a)
        self.b = LoraParam(jnp.zeros(shape_b, w.dtype), axes=axes_b)

    def __call__(self, x: jax.Array, slots=None) -> jax.Array:
        del slots  # one adapter for every token
        return delta(self.eq, x, self.a[...], self.b[...], self.scale, self.dtype)

    def update(self) -> jax.Array:
        """scale * A @ B in the base weight's layout (float32): what merging adds to W."""
        _, _, eq_w = split_eq(self.eq)
        a, b = self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)
        return self.scale * jnp.einsum(eq_w, a, b, precision=jax.lax.Precision.HIGHEST)


# ---------------------------------------------------------------------------
# Building, listing and merging a model's adapters
# ---------------------------------------------------------------------------


def _module(block, target: str):
    """The module of `block` that `target` adapts, or None where this layer has none (the
    MLP projections in an MoE layer, the router in a dense one)."""
    if target in ATTENTION_TARGETS:
        return block.attn
    is_moe = hasattr(block.mlp, "router")
    return block.mlp if (target == "router") == is_moe else None


def attach(model, lcfg: LoraConfig, rngs: nnx.Rngs) -> None:
    """Give every layer of `model` (a Transformer) fresh adapters on `lcfg.targets`."""
    for block in model.layers:
        found = {"attn": {}, "mlp": {}}
        for target in lcfg.targets:
            module = _module(block, target)
            if module is not None:
                attr, weight, eq = PROJECTIONS[target]
                dtype = jnp.float32 if target == "router" else model.cfg.compute_dtype
                found[attr][target] = LoRA(eq, getattr(module, weight), lcfg, dtype, rngs)
        for attr, by_target in found.items():
            if by_target:
                getattr(block, attr).lora = nnx.data(nnx.Dict(by_target))


def adapters(model):
    """(layer, target, base module, LoRA) for every adapter of `model`, in layer order."""
    for block in model.layers:
        for module in (block.attn, block.mlp):
            for target, lora in (module.lora or {}).items():
                yield block.layer, target, module, lora


def add_adapter(model, lcfg: LoraConfig | dict, seed: int = 0):
    """`model` (a Transformer without adapters, e.g. loaded from Hugging Face) with fresh
    adapters: a new model sharing the base weights, its config's `lora` set."""
    if model.cfg.lora is not None:
        raise ValueError("the model already has an adapter; merge(model) folds it in first")
    cfg = dataclasses.replace(model.cfg, lora=lcfg)
    cls = type(model)
    graphdef, _, _ = nnx.split(nnx.eval_shape(lambda: cls(cfg, nnx.Rngs(0))), LoraParam, ...)
    # only the adapters are computed: the base's initialisers are dead code under jit
    fresh = jax.jit(lambda: nnx.state(cls(cfg, nnx.Rngs(seed)), LoraParam))()
    return nnx.merge(graphdef, fresh, nnx.state(model, nnx.Param))


def merge(model):
    """A model without adapters whose weights are W + scale * A @ B: the same function
    (up to rounding) as `model`, at the base model's cost."""
    return _without_adapters(model, fold=True)


def base_model(model):
    """`model`'s base: the same weights, its adapters dropped (not folded in)."""
    return _without_adapters(model, fold=False)


def _without_adapters(model, fold: bool):
    cfg = dataclasses.replace(model.cfg, lora=None)
    cls = type(model)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(cfg, nnx.Rngs(0))), nnx.Param)
    base = nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoraParam))))
    for layer, target, _, lora in adapters(model) if fold else ():
        attr, weight, _ = PROJECTIONS[target]
        tree = base["layers"][layer][attr]
        w = tree[weight]
        tree[weight] = (w.astype(jnp.float32) + lora.update()).astype(w.dtype)
    nnx.replace_by_pure_dict(state, base)
    return nnx.merge(graphdef, state)


def router_weight(module) -> jax.Array:
    """An MoE layer's router [D, E], with its adapter folded in when it has one."""
    router_DE = module.router[...]
    lora = (module.lora or {}).get("router")
    if lora is None:
        return router_DE
    return router_DE.astype(jnp.float32) + lora.update()
