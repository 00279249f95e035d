"""Naive full-recompute decoding: the reference the serving engine is tested against.

Every step re-runs the whole sequence through the model (no KV cache), so it
is slow but obviously right. Greedy when temperature == 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.moe_config import check_servable


@functools.partial(jax.jit, static_argnums=(0,))
def _next_logits(graphdef, params, tokens_BL, lengths_B):
    logits_BLV = nnx.merge(graphdef, params)(tokens_BL)
    return jnp.take_along_axis(logits_BLV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]


def generate(
    model: nnx.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    stop_tokens: tuple[int, ...] = (),
) -> list[list[int]]:
    """Continue each prompt by up to max_new_tokens (stopping after a stop token)."""
    check_servable(model.cfg)
    graphdef, params = nnx.split(model, nnx.Param)
    B = len(prompts)
    lengths = np.array([len(p) for p in prompts])
    if lengths.min() < 1:
        raise ValueError("every prompt needs at least one token")
    total = int(lengths.max()) + max_new_tokens
    buf = np.zeros((B, total), np.int32)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = p
    out: list[list[int]] = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    key = jax.random.key(seed)
    for step in range(max_new_tokens):
        logits = np.asarray(_next_logits(graphdef, params, jnp.asarray(buf), jnp.asarray(lengths)))
        if temperature == 0.0:
            nxt = logits.argmax(-1)
        else:
            key, sub = jax.random.split(key)
            nxt = np.asarray(jax.random.categorical(sub, jnp.asarray(logits) / temperature))
        for i in range(B):
            if done[i]:
                continue
            out[i].append(int(nxt[i]))
            buf[i, lengths[i]] = nxt[i]
            lengths[i] += 1
            done[i] = nxt[i] in stop_tokens
        if done.all() or step == max_new_tokens - 1:
            break
    return out
