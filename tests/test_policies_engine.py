"""Every policy on the real engine: same greedy outputs as FCFS, no leaked pages, no compiles."""

import jax
import numpy as np
import pytest
from flax import nnx

from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.engine import Engine
from mlx_sched.serve.request import SamplingParams, Status
from models import ModelConfig, Transformer
from models import generate as reference

POLICIES = [
    ("fcfs", {}),
    ("static", {}),
    ("sarathi", {"variant": "prefill_first"}),
    ("mlfq", {"q0": 1e-3, "promote_every": 5, "starve_s": 0.01}),
    ("vtc", {"weights": {"c1": 2.0}}),
    ("slice", {"slice_tokens": 5}),
    ("priority", {"mode": "class"}),
    ("priority", {"mode": "sjf"}),
]


@pytest.fixture(scope="module")
def setup():
    cfg = ModelConfig(
        vocab_size=264, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=96
    )
    model = Transformer(cfg, nnx.Rngs(3))
    rng = np.random.default_rng(11)
    prompts = [list(map(int, rng.integers(0, 256, int(n)))) for n in rng.integers(1, 40, 14)]
    max_tokens = [int(n) for n in rng.integers(1, 12, 14)]
    expected = reference.generate(model, prompts, max(max_tokens))
    return model, prompts, max_tokens, expected


@pytest.mark.parametrize("policy, args", POLICIES, ids=[f"{p}-{a}" for p, a in POLICIES])
def test_policy_matches_reference_without_leaks_or_compiles(setup, policy, args):
    model, prompts, max_tokens, expected = setup
    cfg = ServeConfig(
        page_size=4,
        num_pages=40,
        max_seqs=4,
        token_budget=24,
        max_prefill_rows=2,
        slice_len=3,
        decode_buckets=(4,),
        prefill_buckets=(24,),
        policy=policy,
        policy_args=args,
        preemption="swap" if policy == "mlfq" else "recompute",
    )
    engine = Engine(model, cfg)
    rng = np.random.default_rng(5)
    ids, step = [], 0
    with jax.no_tracing(), jax.transfer_guard("disallow"):
        while len(ids) < len(prompts) or engine.has_work():
            if len(ids) < len(prompts) and rng.random() < 0.5:
                i = len(ids)
                ids.append(
                    engine.add_request(
                        prompts[i],
                        SamplingParams(max_tokens=max_tokens[i]),
                        client=f"c{i % 2}",
                        priority=i % 3,
                    )
                )
            engine.step()
            step += 1
            assert step < 3000
    for i, rid in enumerate(ids):
        req = engine.requests[rid]
        assert req.status is Status.FINISHED
        assert req.outputs()[0] == expected[i][: max_tokens[i]], (policy, i)
    engine.pool.check()
    assert engine.pool.num_in_use == 0
    assert engine.runner.compiles_since_warmup == 0
