"""The main job: train a small model on the embedded corpus, serve a trace through the engine.

Variants: default (a few minutes on 2 CPU cores), runlocal (seconds, for tests).

  python -m experiments.main                       # workdir defaults to runs/main
  python -m experiments.main --config=experiments/configs/main.py:runlocal --workdir=/tmp/m
"""

from experiments.configs import lm, serve


def get_config(arg: str = "default"):
    if arg not in ("default", "runlocal"):
        raise ValueError(f"unknown variant '{arg}' of main.py; choose default or runlocal")
    c = lm.get_config("runlocal" if arg == "runlocal" else "default")
    s = serve.get_config("runlocal" if arg == "runlocal" else "default")
    c.serve = s.serve
    c.workload = s.workload
    c.serve.update(num_pages=1024, max_seqs=32, token_budget=256, slice_len=4)
    c.workload.update(num_requests=200, online=True, rate=20.0, length_scale=0.2)
    c.sample.stop_at_newline = True
    if arg == "default":
        c.train.update(steps=150, batch_size=8, eval_every=50, ckpt_every=50, warmup_steps=15)
    else:
        c.serve.update(num_pages=256, max_seqs=8, token_budget=64, decode_buckets=(8,))
        c.workload.update(num_requests=16, rate=50.0, length_scale=0.05)
    return c
