"""FineInfer co-serving and router tuning while serving (experiments/cotrain.py).

A small MoE language model is trained on the built-in corpus (cached in the workdir), then
one process serves a Poisson stream of prompts (windows of the held-out text) with it while
fine-tuning its routers on the training text, under each deferral bound, and the baselines:

  serve_only   the engine alone (routers frozen)
  train_only   router tuning alone, for as long as the serving runs took
  strict       deferral 0: serve as soon as a request waits (strict time-sharing)
  deferral_*   FineInfer: tuning yields once the oldest request has waited the bound

Reported per run: tuning steps per minute, TTFT P50/P99 and TPOT P50; for the co-serving
runs, held-out loss of every served version of the routers and the router load balance
(max/mean tokens per expert), entropy and drops, from the tuning batches and from the
served traffic.

Variants: default (about 10 minutes on 2 CPU cores), runlocal (about a minute: tests).

  python -m experiments.cotrain                          # docs/results/cotrain.json + plots
  python -m experiments.cotrain --config=experiments/configs/cotrain.py:runlocal --workdir=/tmp/co
"""

import ml_collections

from experiments.configs.small_lm import small_model


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
    if arg not in ("default", "runlocal"):
        raise ValueError(f"unknown variant '{arg}' of cotrain.py; choose default or runlocal")
    local = arg == "runlocal"
    c = ml_collections.ConfigDict()
    c.model = small_model(
        local,
        max_seq_len=256,
        moe=dict(num_experts=8, top_k=2, gates="topk_softmax", every=1, offset=0),
    )
    # the base model's pre-training, cached in `base_dir` (empty: <workdir>/cotrain_base)
    c.base_dir = "" if local else "runs/cotrain_base"
    c.train = dict(
        steps=20 if local else 300,
        batch_size=8 if local else 16,
        seq_len=128,
        lr=3e-3,
        warmup_steps=5 if local else 30,
        log_every=10,
        eval_every=20 if local else 100,
        eval_batches=2,
        ckpt_every=20 if local else 100,
    )
    c.tuner = dict(targets=("router",), lr=1e-4, batch_size=8, seq_len=128)
    c.serve = dict(
        page_size=16,
        num_pages=256,
        max_seqs=16,
        token_budget=256,
        slice_len=4,
        decode_buckets=(16,),
        prefill_buckets=(256,),
    )
    c.workload = dict(
        rate=2.0,  # requests per second (Poisson)
        duration_s=8.0 if local else 60.0,  # of arrivals
        prompt_len=(16, 128),
        output_len=(8, 64),
        seed=0,
    )
    c.deferrals = (0.5,) if local else (0.1, 0.5, 1.0, 2.0)
    c.runs = "serve_only,train_only,strict,deferral"  # comma-separated subset
    c.heldout_batches = 2 if local else 4
    return c
