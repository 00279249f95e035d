"""On-device sampling: greedy, temperature, top-k, top-p, with per-request keys.

The order is Hugging Face's and vLLM's: divide by the temperature, keep the top-k, then keep
the smallest set of those whose renormalised probability reaches top-p.

Each row's key is derived from (request seed, sequence index, position) only,
so a request's samples do not depend on what it was batched with. Random
sampling draws one uniform per row and inverts the row's CDF (one exp and one
cumsum over the vocabulary) rather than one Gumbel variate per vocabulary
entry; the whole random path is skipped when every row is greedy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def argmax(logits_SV: jax.Array, block: int = 128) -> jax.Array:
    """First index of each row's maximum, in two stages (block maxima, then within the best
    block): on XLA:CPU a plain argmax over a large vocabulary is ~10x slower."""
    S, V = logits_SV.shape
    n = -(-V // block)
    padded = jnp.pad(logits_SV, ((0, 0), (0, n * block - V)), constant_values=-jnp.inf)
    blocks_SNB = padded.reshape(S, n, block)
    best_S = jnp.argmax(jnp.max(blocks_SNB, axis=-1), axis=-1)
    within = jnp.take_along_axis(blocks_SNB, best_S[:, None, None], axis=1)[:, 0]
    return (best_S * block + jnp.argmax(within, axis=-1)).astype(jnp.int32)


def row_keys(seed_S: jax.Array, seq_S: jax.Array, pos_S: jax.Array) -> jax.Array:
    def one(seed, seq, pos):
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), seq), pos)

    return jax.vmap(one)(seed_S, seq_S, pos_S)


def filter_top_k_top_p(logits_SV, top_k_S, top_p_S):
    """Mask logits outside each row's top-k set, then outside the top-p (nucleus) set of the
    top-k probabilities renormalised (the Hugging Face / vLLM order); exact, via one sort."""
    V = logits_SV.shape[-1]
    sorted_SV = -jnp.sort(-logits_SV, axis=-1)
    k_S = jnp.where(top_k_S > 0, jnp.minimum(top_k_S, V), V)
    in_k_SV = jnp.arange(V)[None, :] < k_S[:, None]
    probs_SV = jax.nn.softmax(jnp.where(in_k_SV, sorted_SV, -jnp.inf), axis=-1)  # over top-k
    before_SV = jnp.cumsum(probs_SV, axis=-1) - probs_SV  # mass strictly above each token
    n_keep_S = jnp.maximum(jnp.sum(in_k_SV & (before_SV < top_p_S[:, None]), axis=-1), 1)
    threshold_S = jnp.take_along_axis(sorted_SV, (n_keep_S - 1)[:, None], axis=-1)[:, 0]
    return jnp.where(logits_SV >= threshold_S[:, None], logits_SV, -jnp.inf)


def weights(logits_SV, temperature_S, top_k_S, top_p_S):
    """Each row's unnormalised sampling weights: exp of the logits over the temperature,
    zero outside the top-k / top-p set (the distribution a sampled row draws from)."""
    scaled_SV = logits_SV / jnp.maximum(temperature_S, 1e-6)[:, None]
    scaled_SV = jax.lax.cond(
        jnp.any((top_k_S > 0) | (top_p_S < 1.0)),
        lambda x: filter_top_k_top_p(x, top_k_S, top_p_S),
        lambda x: x,
        scaled_SV,
    )
    return jnp.exp(scaled_SV - jnp.max(scaled_SV, axis=-1, keepdims=True))


def draw(w_SV, keys):
    """One index per row with probability proportional to its weight (inverse CDF of one
    uniform per row); never an index of weight zero."""
    cdf_SV = jnp.cumsum(w_SV, axis=-1)
    u_S = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys) * cdf_SV[:, -1]
    idx_S = jnp.sum(cdf_SV <= u_S[:, None], axis=-1)
    last_S = w_SV.shape[-1] - 1 - jnp.argmax(w_SV[:, ::-1] > 0, axis=-1)  # last nonzero entry
    return jnp.minimum(idx_S, last_S).astype(jnp.int32)


def _draw(logits_SV, temperature_S, top_k_S, top_p_S, keys):
    """Inverse-CDF sampling from softmax(logits / temperature) after top-k / top-p."""
    return draw(weights(logits_SV, temperature_S, top_k_S, top_p_S), keys)


def chosen_logprob(logits_SV: jax.Array, token_S: jax.Array) -> jax.Array:
    """log-probability of each row's token under the model (before any filtering)."""
    logits_SV = logits_SV.astype(jnp.float32)
    chosen_S = jnp.take_along_axis(logits_SV, token_S[:, None], axis=-1)[:, 0]
    return chosen_S - jax.nn.logsumexp(logits_SV, axis=-1)


def sample(
    logits_SV: jax.Array,
    temperature_S: jax.Array,
    top_k_S: jax.Array,
    top_p_S: jax.Array,
    seed_S: jax.Array,
    seq_S: jax.Array,
    pos_S: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Next token per row and its log-probability under the model (before filtering)."""
    logits_SV = logits_SV.astype(jnp.float32)
    greedy_S = argmax(logits_SV)
    token_S = jax.lax.cond(
        jnp.any(temperature_S > 0),
        lambda: jnp.where(
            temperature_S > 0,
            _draw(logits_SV, temperature_S, top_k_S, top_p_S, row_keys(seed_S, seq_S, pos_S)),
            greedy_S,
        ),
        lambda: greedy_S,
    )
    return token_S, chosen_logprob(logits_SV, token_S)


def sample_with_probs(
    logits_SV: jax.Array,
    temperature_S: jax.Array,
    top_k_S: jax.Array,
    top_p_S: jax.Array,
    seed_S: jax.Array,
    seq_S: jax.Array,
    pos_S: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`sample`'s tokens and log-probabilities, and each row's distribution: for a sampled row
    the one its token was drawn from (after temperature / top-k / top-p: the q of speculative
    decoding's rejection rule), for a greedy row the model's softmax (whose argmax it took;
    its ranking gives a token tree's siblings)."""
    logits_SV = logits_SV.astype(jnp.float32)
    greedy_S = argmax(logits_SV)
    hot_S = temperature_S > 0
    T_S = jnp.where(hot_S, temperature_S, 1.0)
    w_SV = weights(logits_SV, T_S, jnp.where(hot_S, top_k_S, 0), jnp.where(hot_S, top_p_S, 1.0))
    q_SV = w_SV / jnp.sum(w_SV, axis=-1, keepdims=True)
    token_S = jax.lax.cond(
        jnp.any(hot_S),
        lambda: jnp.where(hot_S, draw(w_SV, row_keys(seed_S, seq_S, pos_S)), greedy_S),
        lambda: greedy_S,
    )
    return token_S, chosen_logprob(logits_SV, token_S), q_SV
