"""S-LoRA: throughput and TTFT against the number of adapters (experiments/slora.py).

One base model serves a Poisson stream of requests, each naming one of N adapters (uniformly
at random; ranks alternate between the two of `ranks`), in three modes:

  unified  a pool of `slots` device slots; resident adapters hold pages of the KV page pool
           and give them back when the KV cache needs them (S-LoRA's unified paging)
  fixed    the same slots with a dedicated reserve of slots x (a max-rank adapter's pages)
           taken from the KV pool at start-up
  merged   no pool: one adapter at a time, merged into the weights (W + s * A @ B) whenever
           the engine empties, then every waiting request of that adapter is served

Variants: default (about 4 minutes on 2 CPU cores), runlocal (about a minute: tests).

  python -m experiments.slora                      # docs/results/slora.json + docs/slora.png
  python -m experiments.slora --config=experiments/configs/slora.py:runlocal --workdir=/tmp/sl \
      --plot=/tmp/sl/slora.png
"""

import ml_collections

from experiments.configs.small_lm import small_model


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
    if arg not in ("default", "runlocal"):
        raise ValueError(f"unknown variant '{arg}' of slora.py; choose default or runlocal")
    local = arg == "runlocal"
    c = ml_collections.ConfigDict()
    c.model = small_model(local, max_seq_len=128)
    c.targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    c.ranks = (8, 16)
    c.num_adapters = (1, 4) if local else (1, 8, 32, 128, 256, 1024)
    c.modes = "unified,fixed,merged"  # comma-separated subset
    c.repeats = 1 if local else 3  # runs per point (the median is reported)
    c.slots = 4 if local else 16
    c.serve = dict(
        page_size=16,
        num_pages=64 if local else 160,
        max_seqs=8 if local else 16,
        token_budget=128,
        slice_len=4,
        decode_buckets=(8,) if local else (16,),
        prefill_buckets=(128,),
        packed_matmuls=False,  # merged mode updates the weights in place: unpacked for all
    )
    c.workload = dict(
        requests=12 if local else 160,
        rate=8.0 if local else 400.0,  # requests per second (Poisson): a burst (saturating)
        prompt_len=(16, 64),
        output_len=(8, 32),
        seed=0,
    )
    return c
