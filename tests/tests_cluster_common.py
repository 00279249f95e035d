"""What the cluster tests share: a tiny model, serving settings, a request mix."""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import nnx

from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.request import SamplingParams
from models import ModelConfig, Transformer

MC = ModelConfig(
    vocab_size=128, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=128
)
SERVE = ServeConfig(
    page_size=4,
    num_pages=96,
    max_seqs=8,
    token_budget=32,
    slice_len=2,
    decode_buckets=(8,),
    prefill_buckets=(32,),
)
GREEDY = SamplingParams(max_tokens=14, ignore_eos=True)


def make_requests(seed: int, count: int = 8, scale: int = 1):
    """Prompts of 3..30 tokens with greedy, seeded-sampled and n = 2 requests (outputs of
    about 12 * scale tokens)."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(3, 30, count)
    prompts = [rng.integers(0, MC.vocab_size, int(n)).tolist() for n in lens]
    params = []
    for i in range(count):
        if i % 4 == 1:
            params.append(
                SamplingParams(max_tokens=12 * scale, temperature=1.0, seed=i, ignore_eos=True)
            )
        elif i % 4 == 3:
            params.append(
                SamplingParams(max_tokens=10 * scale, temperature=0.8, n=2, seed=i, ignore_eos=True)
            )
        else:
            params.append(dataclasses.replace(GREEDY, max_tokens=14 * scale))
    return prompts, params


def model_for_tests() -> Transformer:
    return Transformer(MC, nnx.Rngs(0))
