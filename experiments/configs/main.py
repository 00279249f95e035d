"""The main job: train a small model on the embedded corpus, then sample from it.

Variants: default (a few minutes on 2 CPU cores), runlocal (seconds, for tests).

  python -m experiments.main                       # workdir defaults to runs/main
  python -m experiments.main --config=experiments/configs/main.py:runlocal --workdir=/tmp/m
"""

from experiments.configs import lm


def get_config(arg: str = "default"):
    c = lm.get_config("runlocal" if arg == "runlocal" else "default")
    if arg == "default":
        c.train.update(steps=150, batch_size=8, eval_every=50, ckpt_every=50, warmup_steps=15)
    elif arg != "runlocal":
        raise ValueError(f"unknown variant '{arg}' of main.py; choose default or runlocal")
    return c
