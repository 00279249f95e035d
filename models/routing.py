"""MoE routers as pure functions of float32 router logits, and the router's losses and metrics.

Shapes follow the letter key of `models/__init__.py`; here G routing groups,
S tokens per group, E experts, C expert capacity (slots per expert and
group), R experts chosen per token (top-k). A router returns one-hot masks:
`dispatch_GSEC[g, s, e, c]` is 1 when token s of group g fills slot c of
expert e (a token past capacity gets an all-zero row: it is dropped and
carried by the residual connection), and `combine_GSEC` is the same mask
times the token's gate for that expert.

Tokens-choose placement follows Switch/GShard: all first choices are placed
before all second choices; within a choice, token order (or, with batch
priority routing, descending router confidence) decides who gets a slot.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
    dispatch_GSEC: jax.Array  # float32 0/1
    combine_GSEC: jax.Array  # float32 gate * dispatch
    assigned_GE: jax.Array  # float32: tokens the router sent to each expert, before capacity


def top_k_experts(probs_GSE: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Indices [..., R] and probabilities of the k most likely experts, best first.

    An iterative argmax: unlike `lax.top_k` it partitions cleanly when the
    leading dims are sharded, and k is small.
    """
    E = probs_GSE.shape[-1]
    idx, val = [], []
    masked = probs_GSE
    for _ in range(k):
        i = jnp.argmax(masked, axis=-1)
        idx.append(i)
        val.append(jnp.take_along_axis(probs_GSE, i[..., None], axis=-1)[..., 0])
        masked = jnp.where(jax.nn.one_hot(i, E, dtype=bool), -1.0, masked)
    return jnp.stack(idx, axis=-1), jnp.stack(val, axis=-1)


def gate_values(logits_GSE: jax.Array, idx_GSR: jax.Array, p_GSR: jax.Array, gates: str):
    """Combine weights of the chosen experts: router probs, or a softmax over the chosen logits."""
    if gates == "softmax":
        return p_GSR
    return jax.nn.softmax(jnp.take_along_axis(logits_GSE, idx_GSR, axis=-1), axis=-1)


def top_k_routing(
    logits_GSE: jax.Array,
    k: int,
    capacity: int,
    gates: str = "softmax",
    batch_priority: bool = False,
    uniform_GS: jax.Array | None = None,
) -> Routing:
    """Tokens choose their top-k experts; slots are filled first choices first.

    `uniform_GS` (U[0, 1) per token) turns on GShard's random second-expert
    policy: the second expert is kept when uniform < 2 * g2 / (g1 + g2).
    """
    G, S, E = logits_GSE.shape
    probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
    idx_GSR, p_GSR = top_k_experts(probs_GSE, k)
    gate_GSR = gate_values(logits_GSE, idx_GSR, p_GSR, gates)
    active_GSR = jnp.ones((G, S, k), bool)
    if uniform_GS is not None and k == 2:
        second = p_GSR[..., 1] / (p_GSR[..., 0] + p_GSR[..., 1])
        active_GSR = active_GSR.at[..., 1].set(uniform_GS < 2.0 * second)
    choice_GSRE = jax.nn.one_hot(idx_GSR, E) * active_GSR[..., None]

    if batch_priority:  # most confident tokens first (V-MoE BPR), stable for ties
        order_GS = jnp.argsort(-p_GSR[..., 0], axis=1, stable=True)
    else:
        order_GS = jnp.broadcast_to(jnp.arange(S), (G, S))
    sorted_GSRE = jnp.take_along_axis(choice_GSRE, order_GS[:, :, None, None], axis=1)
    # fill order: all first choices (in priority order), then all second choices, ...
    flat_GAE = sorted_GSRE.transpose(0, 2, 1, 3).reshape(G, k * S, E)
    pos_GAE = (jnp.cumsum(flat_GAE, axis=1) - 1.0) * flat_GAE
    pos_sorted_GSRE = pos_GAE.reshape(G, k, S, E).transpose(0, 2, 1, 3)
    inverse_GS = jnp.argsort(order_GS, axis=1)
    pos_GSRE = jnp.take_along_axis(pos_sorted_GSRE, inverse_GS[:, :, None, None], axis=1)
    pos_GSR = jnp.sum(pos_GSRE, axis=-1).astype(jnp.int32)  # slot in the chosen expert
    kept_GSR = active_GSR & (pos_GSR < capacity)
    slot_GSRC = jax.nn.one_hot(pos_GSR, capacity) * kept_GSR[..., None]
    dispatch_GSEC = jnp.einsum("gsre,gsrc->gsec", choice_GSRE, slot_GSRC)
    combine_GSEC = jnp.einsum("gsre,gsrc->gsec", choice_GSRE * gate_GSR[..., None], slot_GSRC)
    return Routing(dispatch_GSEC, combine_GSEC, jnp.sum(choice_GSRE, axis=(1, 2)))


def expert_choice_routing(logits_GSE: jax.Array, capacity: int) -> Routing:
    """Each expert takes the `capacity` tokens of a group with the highest probability for it."""
    S = logits_GSE.shape[1]
    probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
    gate_GEC, idx_GEC = jax.lax.top_k(probs_GSE.transpose(0, 2, 1), capacity)
    dispatch_GSEC = jax.nn.one_hot(idx_GEC, S, axis=1)
    combine_GSEC = dispatch_GSEC * gate_GEC[:, None]
    return Routing(dispatch_GSEC, combine_GSEC, jnp.sum(dispatch_GSEC, axis=(1, 3)))


# ---------------------------------------------------------------------------
# Losses and metrics
# ---------------------------------------------------------------------------


def load_balancing_loss(probs_GSE: jax.Array) -> jax.Array:
    """Switch/GShard aux loss E * sum_e f_e * P_e per group, averaged over groups.

    f_e is the share of tokens whose first choice is e, P_e the mean router
    probability of e: 1.0 for balanced uniform routing, E for collapse onto one expert.
    """
    E = probs_GSE.shape[-1]
    f_GE = jnp.mean(jax.nn.one_hot(jnp.argmax(probs_GSE, axis=-1), E), axis=1)
    P_GE = jnp.mean(probs_GSE, axis=1)
    return jnp.mean(E * jnp.sum(f_GE * P_GE, axis=-1))


def z_loss(logits_GSE: jax.Array) -> jax.Array:
    """Router z-loss mean(logsumexp(logits)^2): log(E)^2 for zero logits."""
    return jnp.mean(jax.nn.logsumexp(logits_GSE, axis=-1) ** 2)


def router_entropy(probs_GSE: jax.Array) -> jax.Array:
    """Mean per-token entropy (nats) of the router distribution."""
    return jnp.mean(-jnp.sum(probs_GSE * jnp.log(jnp.maximum(probs_GSE, 1e-30)), axis=-1))


def dropped_fraction(dispatch_GSEC: jax.Array) -> jax.Array:
    """Share of tokens sent to no expert at all (carried only by the residual)."""
    return jnp.mean((jnp.max(dispatch_GSEC, axis=(2, 3)) == 0).astype(jnp.float32))


def load_imbalance(tokens_per_expert_E: jax.Array) -> jax.Array:
    """max / mean of the router's per-expert load (1.0 is perfectly balanced)."""
    return jnp.max(tokens_per_expert_E) / jnp.maximum(jnp.mean(tokens_per_expert_E), 1e-9)


def router_stats(
    logits_GSE: jax.Array,
    dropped: jax.Array,
    tokens_per_expert_E: jax.Array,
    mean=lambda v: v,
    total=lambda v: v,
) -> dict[str, jax.Array]:
    """Unweighted router losses and metrics of one layer.

    `mean` / `total` reduce a per-device value over the devices that shard
    tokens (identity off-mesh): means for losses and rates, sums for counts.
    """
    probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
    tokens_per_expert_E = total(tokens_per_expert_E)
    return {
        "aux_loss": mean(load_balancing_loss(probs_GSE)),
        "z_loss": mean(z_loss(logits_GSE)),
        "router_entropy": mean(router_entropy(probs_GSE)),
        "dropped": mean(dropped),
        "tokens_per_expert": tokens_per_expert_E,
        "load_imbalance": load_imbalance(tokens_per_expert_E),
    }
