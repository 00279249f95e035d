"""Mixture-of-Experts feed-forward layer: E SwiGLU experts behind a float32 router.

Letters as in `models/__init__.py` (G groups, S tokens per group, E experts,
C capacity, R experts per token, A routed (token, expert) pairs).

Two forward forms:

- capacity-limited ("train", "eval", and "serve" with a serve capacity
  factor): tokens are cut into groups, routed with per-group capacity, and
  moved with one-hot einsums `gsd,gsec->egcd` / `egcd,gsec->gsd`. Under a
  mesh this runs inside `jax.shard_map`: each device routes its own groups,
  one `all_to_all` over the expert axis sends every expert its slots and one
  brings the results back. Two all-to-alls, no all-gather of activations.
- dropless ("serve", the default): every token reaches its top-k experts;
  assignments are sorted by expert and run through `lax.ragged_dot`, so a
  token's output never depends on the other tokens in the batch.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from models import lora as lora_lib
from models import routing
from models.config import ConfigError, ModelConfig
from models.layers import param
from models.moe_config import MoEConfig, check_servable
from sharding.rules import constrain, logical_to_spec


class MoE(nnx.Module):
    """Router [D, E] and stacked expert weights [E, D, F], [E, F, D]."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.moe: MoEConfig = cfg.moe
        self.model_cfg = cfg
        self.dtype = cfg.compute_dtype
        E, D, F = cfg.moe.num_experts, cfg.d_model, cfg.d_ff
        self.router = param(rngs, (D, E), ("embed", None), cfg)
        self.w_gate = param(rngs, (E, D, F), ("expert", "embed", "mlp"), cfg)
        self.w_up = param(rngs, (E, D, F), ("expert", "embed", "mlp"), cfg)
        self.w_down = param(rngs, (E, F, D), ("expert", "mlp", "embed"), cfg)
        self.lora = None  # a LoRA adapter on the router (models/lora.py attaches it)

    def __call__(self, x_TD: jax.Array, ctx, rng: jax.Array | None = None):
        """Flat tokens [T, D] -> ([T, D], aux): aux["loss"] is the weighted router loss."""
        mode = ctx.mode
        if mode == "serve":
            check_servable(self.model_cfg)
        cf = self.moe.capacity_factor_for(mode)
        if cf is None:
            return self._dropless(x_TD)
        return self._with_capacity(x_TD, ctx, rng if mode == "train" else None, cf)

    def _weights(self):
        router_DE = lora_lib.router_weight(self)
        return router_DE, self.w_gate[...], self.w_up[...], self.w_down[...]

    # -- dropless -----------------------------------------------------------

    def _dropless(self, x_TD: jax.Array):
        moe, dtype = self.moe, self.dtype
        router_DE, w_gate, w_up, w_down = self._weights()
        T, E, k = x_TD.shape[0], moe.num_experts, moe.top_k
        logits_TE = x_TD.astype(jnp.float32) @ router_DE.astype(jnp.float32)
        probs_TE = jax.nn.softmax(logits_TE, axis=-1)
        idx_TR, p_TR = routing.top_k_experts(probs_TE, k)
        gate_TR = routing.gate_values(logits_TE, idx_TR, p_TR, moe.gates)
        expert_A = idx_TR.reshape(T * k)
        order_A = jnp.argsort(expert_A, stable=True)
        sizes_E = jnp.bincount(expert_A, length=E).astype(jnp.int32)
        xs_AD = x_TD[order_A // k].astype(dtype)
        rdot = lambda a, w: jax.lax.ragged_dot(
            a, w.astype(dtype), sizes_E, preferred_element_type=jnp.float32
        ).astype(dtype)
        h_AF = jax.nn.silu(rdot(xs_AD, w_gate)) * rdot(xs_AD, w_up)
        ys_AD = rdot(h_AF, w_down)
        y_TRD = jnp.zeros_like(ys_AD).at[order_A].set(ys_AD).reshape(T, k, -1)
        y_TD = jnp.einsum("trd,tr->td", y_TRD.astype(jnp.float32), gate_TR)
        stats = routing.router_stats(logits_TE[None], jnp.zeros(()), sizes_E.astype(jnp.float32))
        return y_TD.astype(dtype), self._aux(stats)

    # -- capacity-limited, expert-parallel -----------------------------------

    def _groups(self, T: int, ctx) -> tuple[int, int]:
        S = self.moe.group_size or (T if ctx.mode == "serve" else ctx.length)
        if T % S:
            raise ConfigError(
                f"{T} tokens do not split into routing groups of {S} (moe.group_size)"
            )
        return T // S, S

    def _with_capacity(self, x_TD: jax.Array, ctx, rng, cf: float):
        moe = self.moe
        T, D = x_TD.shape
        G, S = self._groups(T, ctx)
        C = moe.capacity(S, cf)
        router = "top_k" if ctx.mode == "serve" else moe.router  # EC serves its causal fallback
        x_GSD = constrain(x_TD.reshape(G, S, D), ("act_group", None, None))
        extra = {}
        if rng is not None:
            jit_key, pol_key = jax.random.split(rng)
            if moe.jitter > 0:
                eps = moe.jitter
                noise = jax.random.uniform(jit_key, (G, S, D), jnp.float32, 1 - eps, 1 + eps)
                extra["noise_GSD"] = constrain(noise, ("act_group", None, None))
            if moe.second_policy == "random" and router == "top_k":
                u = jax.random.uniform(pol_key, (G, S), jnp.float32)
                extra["uniform_GS"] = constrain(u, ("act_group", None))
        local = functools.partial(
            _route_and_run, moe=moe, router=router, capacity=C, dtype=self.dtype
        )
        weights = self._weights()
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or mesh.size == 1:
            y_GSD, stats = local(x_GSD, weights, extra, axes=_Axes())
        else:
            axes = _Axes.of(dict(mesh.shape), G, moe.num_experts, self.model_cfg.d_ff)
            tok = P(axes.tokens)
            w_specs = (
                P(),
                P(axes.expert, None, axes.tensor),
                P(axes.expert, None, axes.tensor),
                P(axes.expert, axes.tensor, None),
            )
            run = jax.shard_map(
                functools.partial(local, axes=axes),
                in_specs=(tok, w_specs, jax.tree.map(lambda _: tok, extra)),
                out_specs=(tok, P()),
            )
            y_GSD, stats = run(x_GSD, weights, extra)
        y_TD = constrain(y_GSD.reshape(T, D), ("act_batch", "act_embed"))
        return y_TD, self._aux(stats)

    def _aux(self, stats: dict) -> dict:
        """Router metrics plus "loss": the coefficient-weighted aux and z losses."""
        moe = self.moe
        loss = moe.aux_loss_coef * stats["aux_loss"] + moe.z_loss_coef * stats["z_loss"]
        return {"loss": loss, **stats}


@dataclasses.dataclass(frozen=True)
class _Axes:
    """Mesh axes (from the rules table) the capacity path shards over; empty off-mesh."""

    tokens: tuple[str, ...] = ()  # routing groups: data-like axes, including the expert axis
    expert: tuple[str, ...] = ()  # experts
    tensor: tuple[str, ...] = ()  # each expert's hidden dim

    @classmethod
    def of(cls, mesh_shape: dict[str, int], groups: int, num_experts: int, d_ff: int) -> _Axes:
        tokens = _spec_axes(logical_to_spec(("act_group",), mesh_shape)[0])
        expert = _spec_axes(logical_to_spec(("expert",), mesh_shape)[0])
        tensor = _spec_axes(logical_to_spec(("mlp",), mesh_shape, (d_ff,))[0])
        n_tok = _size(tokens, mesh_shape)
        if groups % n_tok:
            raise ConfigError(
                f"{groups} routing groups do not divide over the {n_tok} devices that shard "
                f"tokens (mesh {mesh_shape}); change the batch size or model.moe.group_size"
            )
        check_expert_axis(num_experts, _size(expert, mesh_shape))
        if not set(expert) <= set(tokens):
            raise ConfigError("the rules must shard routing groups over the expert mesh axes")
        return cls(tokens, expert, tensor)


def _spec_axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _size(axes: tuple[str, ...], mesh_shape: dict[str, int]) -> int:
    n = 1
    for a in axes:
        n *= mesh_shape[a]
    return n


def check_expert_axis(num_experts: int, expert_devices: int) -> None:
    """Experts are split evenly over the expert axis, or it is a config error."""
    if num_experts % expert_devices:
        raise ConfigError(
            f"model.moe.num_experts={num_experts} is not divisible by the {expert_devices} "
            "devices of the expert mesh axis"
        )


def check_mesh(cfg: ModelConfig, mesh_shape: dict[str, int], batch: int, length: int) -> None:
    """Config-time checks of an MoE model on a mesh: experts and groups must divide it."""
    moe = cfg.moe
    if moe is None:
        return
    T = batch * length
    S = moe.group_size or length
    if T % S:
        raise ConfigError(f"{T} tokens per batch do not split into routing groups of {S}")
    _Axes.of(mesh_shape, T // S, moe.num_experts, cfg.d_ff)


def _route_and_run(x_GSD, weights, extra, *, moe: MoEConfig, router: str, capacity, dtype, axes):
    """One device's groups: route, dispatch (all-to-all), run experts, return, combine."""
    router_DE, w_gate_EDF, w_up_EDF, w_down_EFD = weights
    x32_GSD = x_GSD.astype(jnp.float32)
    if "noise_GSD" in extra:
        x32_GSD = x32_GSD * extra["noise_GSD"]
    logits_GSE = x32_GSD @ router_DE.astype(jnp.float32)
    if router == "expert_choice":
        r = routing.expert_choice_routing(logits_GSE, capacity)
    else:
        r = routing.top_k_routing(
            logits_GSE,
            moe.top_k,
            capacity,
            moe.gates,
            moe.batch_priority,
            extra.get("uniform_GS"),
        )
    f32 = jnp.float32
    xin_EGCD = jnp.einsum(
        "gsd,gsec->egcd",
        x_GSD.astype(dtype),
        r.dispatch_GSEC.astype(dtype),
        preferred_element_type=f32,
    ).astype(dtype)
    if axes.expert:  # first all-to-all: every device gets its experts' slots from all groups
        xin_EGCD = jax.lax.all_to_all(xin_EGCD, axes.expert, 0, 1, tiled=True)
    ffn = lambda eq, a, w: jnp.einsum(eq, a, w.astype(dtype), preferred_element_type=f32)
    gate = ffn("egcd,edf->egcf", xin_EGCD, w_gate_EDF)
    up = ffn("egcd,edf->egcf", xin_EGCD, w_up_EDF)
    h_EGCF = (jax.nn.silu(gate) * up).astype(dtype)
    out_EGCD = ffn("egcf,efd->egcd", h_EGCF, w_down_EFD)
    if axes.tensor:  # expert hidden dim sharded over tensor: sum the partial outputs
        out_EGCD = jax.lax.psum(out_EGCD, axes.tensor)
    out_EGCD = out_EGCD.astype(dtype)
    if axes.expert:  # second all-to-all: results go back to the groups' devices
        out_EGCD = jax.lax.all_to_all(out_EGCD, axes.expert, 1, 0, tiled=True)
    y_GSD = jnp.einsum(
        "egcd,gsec->gsd", out_EGCD, r.combine_GSEC.astype(dtype), preferred_element_type=f32
    ).astype(dtype)

    mean = (lambda v: jax.lax.pmean(v, axes.tokens)) if axes.tokens else (lambda v: v)
    total = (lambda v: jax.lax.psum(v, axes.tokens)) if axes.tokens else (lambda v: v)
    dropped = routing.dropped_fraction(r.dispatch_GSEC)
    tokens_E = jnp.sum(r.assigned_GE, axis=0)
    return y_GSD, routing.router_stats(logits_GSE, dropped, tokens_E, mean, total)
