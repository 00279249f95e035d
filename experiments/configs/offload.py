"""FlexGen-style offload: throughput of offloaded batch generation against the device budget, the
cost model's predicted time beside the measured one (experiments/offload.py).

A random Llama-shaped model (default: d 512, 8 layers, d_ff 1536, vocab 1024, float32: 96 MiB
of block weights) generates `max_tokens` tokens for `batch` prompts of `prompt_len` tokens. The
device budget goes from "everything fits" (cap_fraction 1) down to the least any placement
needs (0: every layer streamed, one computing while the next arrives); at each cap the
cost-model search picks what stays on the device.

Variants: default (about 2 minutes on 2 CPU cores), runlocal (seconds: tests).

  python -m experiments.offload                   # docs/results/offload.json, docs/offload.png
  python -m experiments.offload --config=experiments/configs/offload.py:runlocal \
      --workdir=/tmp/offload --plot=/tmp/offload/offload.png
"""

import ml_collections


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
    if arg not in ("default", "runlocal"):
        raise ValueError(f"unknown variant '{arg}' of offload.py; choose default or runlocal")
    c = ml_collections.ConfigDict()
    c.model = dict(
        vocab_size=1024,
        d_model=512,
        n_layers=8,
        n_heads=8,
        n_kv_heads=4,
        d_ff=1536,
        max_seq_len=256,
    )
    c.batch = 32
    c.prompt_len = 32
    c.max_tokens = 32
    c.cap_fractions = (1.0, 0.75, 0.5, 0.25, 0.1, 0.0)
    c.runs = 2  # timed runs per cap after a warm-up; the fastest is reported
    c.seed = 0
    if arg == "runlocal":
        c.model.update(vocab_size=128, d_model=32, n_layers=3, n_heads=2, n_kv_heads=1, d_ff=64)
        c.update(batch=2, prompt_len=4, max_tokens=3, cap_fractions=(1.0, 0.0), runs=1)
    return c
