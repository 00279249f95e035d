"""The main job: train a small MoE model on the embedded corpus, serve a trace through the engine.

The model is the default `lm` decoder (d_model 256, 4 layers) with every other MLP a
Switch (top-1) MoE layer of 4 experts; served dropless (no token is ever dropped, so a
request's output does not depend on its batch companions).

Variants: default (a few minutes on 2 CPU cores), runlocal (seconds, for tests).

  python -m experiments.main                       # workdir defaults to runs/main
  python -m experiments.main --config=experiments/configs/main.py:runlocal --workdir=/tmp/m
"""

import dataclasses

from experiments.configs import lm, serve
from models.moe_config import MoEConfig


def get_config(arg: str = "default"):
    if arg not in ("default", "runlocal"):
        raise ValueError(f"unknown variant '{arg}' of main.py; choose default or runlocal")
    c = lm.get_config("runlocal" if arg == "runlocal" else "default")
    s = serve.get_config("runlocal" if arg == "runlocal" else "default")
    moe = MoEConfig(num_experts=4, top_k=1, capacity_factor=1.25, every=2, offset=1)
    c.model.moe = lm.optional(dataclasses.asdict(moe))
    c.serve = s.serve
    c.workload = s.workload
    c.serve.update(num_pages=1024, max_seqs=32, token_budget=256, slice_len=4)
    c.workload.update(num_requests=200, online=True, rate=20.0, length_scale=0.2)
    c.sample.stop_at_newline = True
    if arg == "default":
        c.train.update(steps=150, batch_size=8, eval_every=50, ckpt_every=50)
    else:
        c.serve.update(num_pages=256, max_seqs=8, token_budget=64, decode_buckets=(8,))
        c.workload.update(num_requests=16, rate=50.0, length_scale=0.05)
    return c
