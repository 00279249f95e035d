"""Acceptance of a chain of draft tokens, on device, inside the verify step.

A decode slot of the verify step computes L positions: its last token, then
its k <= L - 1 draft tokens x_1..x_k. Row j's logits give the target's
distribution p_j of the token after position j, so row j - 1 verifies x_j
and row k gives the bonus token. Two rules, both exact:

- *match* (`q` absent): the target samples every row with its own
  per-position key, as it would without speculation, and x_j is accepted while
  it equals that sample. The output is token for token the non-speculative
  output, greedy or sampled. For a deterministic draft (prompt lookup) this is
  Leviathan's rule with q a point mass: P(accept) = p(x).
- *rejection* (Leviathan et al.; `q_DKV` the draft's distributions): accept
  x_j with probability min(1, p_j(x_j) / q_j(x_j)); at the first rejection
  sample from norm(max(0, p_j - q_j)); if every draft is accepted the bonus is
  the row's ordinary sample from p. The output has the target's distribution
  (not its realisation without speculation). Greedy rows accept while the
  argmax equals the draft under either rule.

Temperature, top-k and top-p shape p here exactly as they shaped q in the
draft (`sampling.weights`). Keys derive from (seed, sequence, position) only:
the acceptance uniform and the residual draw fold 1 and 2 into the key of the
row's ordinary sample, so results do not depend on batch companions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlx_sched.serve.sampling import draw, weights

ACCEPT_STREAM, RESIDUAL_STREAM = 1, 2


def _normalised(w_SV):
    return w_SV / jnp.sum(w_SV, axis=-1, keepdims=True)


def verify_chain(
    logits_DLV: jax.Array,
    samples_DL: jax.Array,
    drafts_DK: jax.Array,
    num_drafts_D: jax.Array,
    sampling: dict,
    keys_DL: jax.Array,
    q_DKV: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """-> (tokens_DL, accepted_D): slot i keeps tokens[i, : accepted[i] + 1] (the accepted
    drafts, then the correction or bonus token). `samples_DL` are the rows' ordinary samples
    (argmax for greedy rows); `sampling` holds per-slot `temperature`, `top_k`, `top_p`;
    `keys_DL` the rows' sampling keys."""
    D, L, V = logits_DLV.shape
    K = L - 1
    j_K = jnp.arange(K)
    proposed_DK = j_K[None, :] < num_drafts_D[:, None]
    greedy_D = sampling["temperature"] <= 0
    match_DK = samples_DL[:, :K] == drafts_DK

    def count(ok_DK):  # drafts accepted before the first rejection
        return jnp.sum(jnp.cumprod((ok_DK & proposed_DK).astype(jnp.int32), axis=-1), axis=-1)

    def final(accepted_D):  # the row after the accepted drafts: its ordinary sample
        return jnp.take_along_axis(samples_DL, accepted_D[:, None], axis=-1)[:, 0]

    if q_DKV is None or K == 0:
        accepted_D = count(match_DK).astype(jnp.int32)
        return _tokens(drafts_DK, accepted_D, final(accepted_D)), accepted_D

    def rejection(_):
        T = jnp.repeat(sampling["temperature"], K)
        w = weights(
            logits_DLV[:, :K].reshape(D * K, V).astype(jnp.float32),
            T,
            jnp.repeat(sampling["top_k"], K),
            jnp.repeat(sampling["top_p"], K),
        )
        p_DKV = _normalised(w).reshape(D, K, V)
        q32_DKV = q_DKV.astype(jnp.float32)
        x = drafts_DK[..., None]
        p_DK = jnp.take_along_axis(p_DKV, x, axis=-1)[..., 0]
        q_DK = jnp.take_along_axis(q32_DKV, x, axis=-1)[..., 0]
        u_DK = jax.vmap(jax.vmap(lambda k: jax.random.uniform(_fold(k, ACCEPT_STREAM))))(
            keys_DL[:, :K]
        )
        accepted_D = count(jnp.where(greedy_D[:, None], match_DK, u_DK * q_DK < p_DK))
        # the first rejected draft's residual norm(max(0, p - q))
        r = jnp.minimum(accepted_D, K - 1)[:, None, None]
        p_DV = jnp.take_along_axis(p_DKV, r, axis=1)[:, 0]
        w_DV = jnp.maximum(p_DV - jnp.take_along_axis(q32_DKV, r, axis=1)[:, 0], 0.0)
        w_DV = jnp.where(jnp.sum(w_DV, -1, keepdims=True) > 0, w_DV, p_DV)  # p == q: no residual
        keys_D = jnp.take_along_axis(keys_DL, accepted_D[:, None], axis=1)[:, 0]
        drawn_D = draw(w_DV, jax.vmap(lambda k: _fold(k, RESIDUAL_STREAM))(keys_D))
        rejected_D = (accepted_D < num_drafts_D) & ~greedy_D
        return accepted_D, jnp.where(rejected_D, drawn_D, final(accepted_D))

    def greedy(_):
        accepted_D = count(match_DK)
        return accepted_D, final(accepted_D)

    accepted_D, final_D = jax.lax.cond(jnp.any(~greedy_D), rejection, greedy, None)
    accepted_D = accepted_D.astype(jnp.int32)
    return _tokens(drafts_DK, accepted_D, final_D), accepted_D


def _tokens(drafts_DK, accepted_D, final_D):
    """Each slot's accepted drafts, then its final token (repeated over the unused rows)."""
    D, K = drafts_DK.shape
    j_L = jnp.arange(K + 1)[None, :]
    drafts_DL = jnp.pad(drafts_DK, ((0, 0), (0, 1)))
    return jnp.where(j_L < accepted_D[:, None], drafts_DL, final_D[:, None]).astype(jnp.int32)


def _fold(key, stream: int):
    return jax.random.fold_in(key, stream)


def ancestors(parent_DL: jax.Array) -> jax.Array:
    """[D, L, L] bool: node j is node i or one of its ancestors (parent -1: a root or an
    unused node)."""
    D, L = parent_DL.shape
    eye = jnp.broadcast_to(jnp.eye(L, dtype=bool), (D, L, L))
    cur_DL = jnp.broadcast_to(jnp.arange(L), (D, L))
    out = eye
    for _ in range(L - 1):  # walk up one level per pass
        cur_DL = jnp.where(
            cur_DL >= 0, jnp.take_along_axis(parent_DL, jnp.maximum(cur_DL, 0), 1), -1
        )
        hit = (cur_DL[..., None] == jnp.arange(L)) & (cur_DL[..., None] >= 0)
        out = out | hit
    return out


def verify_tree(
    logits_DLV: jax.Array,
    samples_DL: jax.Array,
    tokens_DL: jax.Array,
    parent_DL: jax.Array,
    sampling: dict,
    keys_DL: jax.Array | None,
    q_DKV: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Acceptance over a token tree per slot (SpecInfer) -> (tokens_DL, accepted_D, path_DL).

    Node 0 is the slot's last token; node c > 0 holds draft `tokens_DL[:, c]` with parent
    `parent_DL[:, c]` < c (-1: unused). Walking from the root, the children of the current
    node u are tried in index order: under the match rule (and for greedy rows) the child
    equal to u's own sample (its argmax) is taken; under the rejection rule (`q_DKV[:, c - 1]`
    the distribution child c was drawn from) child c is taken with probability
    min(1, p(x_c) / q(x_c)), and on its rejection p becomes norm(max(0, p - q)) for the next
    child — SpecInfer's multi-step speculative sampling. When no child is taken the final token
    is drawn from that residual (or is u's own sample when u has no child tried). Nodes are in
    topological order, so one pass over c = 1..L-1 walks the whole tree. `path_DL[:, i]` is
    the node taken at depth i (path[:, 0] = 0), `tokens_DL[:, :accepted + 1]` the accepted
    tokens and the final one.
    """
    D, L, V = logits_DLV.shape
    greedy_D = sampling["temperature"] <= 0
    rows = jnp.arange(D)

    def walk(rejection: bool):
        if rejection:
            w = weights(
                logits_DLV.reshape(D * L, V).astype(jnp.float32),
                jnp.repeat(sampling["temperature"], L),
                jnp.repeat(sampling["top_k"], L),
                jnp.repeat(sampling["top_p"], L),
            )
            p_all = _normalised(w).reshape(D, L, V)
            p_DV = p_all[:, 0]
        u_D = jnp.zeros((D,), jnp.int32)
        tried_D = jnp.zeros((D,), bool)  # a child of u was tried (and rejected)
        acc_D = jnp.zeros((D,), jnp.int32)
        path_DL = jnp.zeros((D, L), jnp.int32)
        for c in range(1, L):
            x_D = tokens_DL[:, c]
            is_child = parent_DL[:, c] == u_D
            y_D = samples_DL[rows, u_D]
            take = is_child & (x_D == y_D)
            if rejection:
                q_cV = q_DKV[:, c - 1].astype(jnp.float32)
                px, qx = p_DV[rows, x_D], q_cV[rows, x_D]
                key_D = keys_DL[rows, u_D]
                u01 = jax.vmap(
                    lambda k, c=c: jax.random.uniform(_fold(_fold(k, ACCEPT_STREAM), c))
                )(key_D)
                take = jnp.where(greedy_D, take, is_child & (u01 * qx < px))
                resid = jnp.maximum(p_DV - q_cV, 0.0)
                ok = jnp.sum(resid, -1, keepdims=True) > 0
                resid = jnp.where(
                    ok, resid / jnp.where(ok, jnp.sum(resid, -1, keepdims=True), 1), p_DV
                )
                rejected = is_child & ~take & ~greedy_D
                p_DV = jnp.where(
                    take[:, None], p_all[:, c], jnp.where(rejected[:, None], resid, p_DV)
                )
                tried_D = jnp.where(take, False, tried_D | rejected)
            acc_D = acc_D + take
            path_DL = path_DL.at[rows, acc_D].set(jnp.where(take, c, path_DL[rows, acc_D]))
            u_D = jnp.where(take, c, u_D)
        final_D = samples_DL[rows, u_D]
        if rejection:
            keys_D = keys_DL[rows, u_D]
            drawn = draw(p_DV, jax.vmap(lambda k: _fold(k, RESIDUAL_STREAM))(keys_D))
            final_D = jnp.where(tried_D & ~greedy_D, drawn, final_D)
        return acc_D, path_DL, final_D

    if q_DKV is None:
        acc_D, path_DL, final_D = walk(False)
    else:
        acc_D, path_DL, final_D = jax.lax.cond(
            jnp.any(~greedy_D), lambda _: walk(True), lambda _: walk(False), None
        )
    j_L = jnp.arange(L)[None, :]
    nxt_DL = jnp.take_along_axis(tokens_DL, jnp.roll(path_DL, -1, axis=1), axis=1)
    out_DL = jnp.where(j_L < acc_D[:, None], nxt_DL, final_D[:, None]).astype(jnp.int32)
    return out_DL, acc_D.astype(jnp.int32), path_DL
