"""The step bundle's host -> device transfer: one packed buffer against a dict of arrays.

  python -m experiments.bench_transfer                 # batches 1, 4, 32; ~2 min
  python -m experiments.bench_transfer --batches=1 --output=16 --runs=1

Two engines over the same random model (6 layers, d 256, the speculative experiment's
target shape, float32) in one process, run alternately on the same requests (64-token
prompts, --output greedy tokens, EOS ignored): `packed` is the engine as it is (each step's
bundle travels as one int32 buffer, `batches.Packed`); `per-array` also puts the step's dict
of small arrays with one `jax.device_put`, as the engine did before, so its extra cost is
that transfer. Output tokens/s, best and median of --runs; the tokens must be equal.
"""

from __future__ import annotations

import time

import numpy as np
from absl import flags

from experiments import common, spec_lab

_BATCHES = flags.DEFINE_list("batches", ["1", "4", "32"], "concurrent requests")
_OUT = flags.DEFINE_integer("output", 96, "output tokens per request")
_RUNS = flags.DEFINE_integer("runs", 5, "timed runs per engine and batch (alternating)")


def main(argv):
    del argv
    import jax
    from flax import nnx

    from mlx_sched.serve.batches import Packed
    from mlx_sched.serve.config import ServeConfig
    from mlx_sched.serve.engine import Engine
    from mlx_sched.serve.request import SamplingParams
    from models import ModelConfig, Transformer

    layers, d, heads, kv, ff, _ = spec_lab.MODELS["target"]
    mc = ModelConfig(vocab_size=264, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv,
                     d_ff=ff, max_seq_len=1024, dtype="float32")  # fmt: skip
    model = Transformer(mc, nnx.Rngs(0))
    batches = [int(b) for b in _BATCHES.value]
    top = 1 << (max(batches) - 1).bit_length()
    slots = tuple(2**i for i in range(top.bit_length()))
    mixed = tuple(sorted({*slots[::2], top}))
    cfg = ServeConfig(num_pages=4096, token_budget=512, max_context=1024, max_seqs=top,
                      decode_buckets=slots, mixed_decode_buckets=mixed)  # fmt: skip
    packed, per_array = Engine(model, cfg), Engine(model, cfg)
    r = per_array.runner

    def both(bundle):  # the old per-array put, then the packed one the step takes
        jax.block_until_ready(jax.device_put(bundle, r.repl))
        return jax.device_put(Packed.pack(bundle), r.repl)

    r._to_device = both
    engines = {"packed": packed, "per-array": per_array}
    sp = SamplingParams(max_tokens=_OUT.value, ignore_eos=True)
    rng = np.random.default_rng(0)
    print("| batch | packed tok/s best (median) | per-array tok/s best (median) "
          "| ratio best (median) |")  # fmt: skip
    print("|---|---|---|---|")
    for b in batches:
        prompts = [list(map(int, rng.integers(3, 264, 64))) for _ in range(b)]
        outs = {n: [x.outputs[0] for x in e.generate(prompts, sp)] for n, e in engines.items()}
        assert outs["packed"] == outs["per-array"], "the two engines' tokens differ"
        walls = {n: [] for n in engines}
        for _ in range(_RUNS.value):
            for n, e in engines.items():
                t0 = time.perf_counter()
                e.generate(prompts, sp)
                walls[n].append(time.perf_counter() - t0)
        tok = {n: (b * _OUT.value / min(w), b * _OUT.value / float(np.median(w)))
               for n, w in walls.items()}  # fmt: skip
        p, a = tok["packed"], tok["per-array"]
        print(f"| {b} | {p[0]:,.0f} ({p[1]:,.0f}) | {a[0]:,.0f} ({a[1]:,.0f}) "
              f"| {p[0] / a[0]:.2f}x ({p[1] / a[1]:.2f}x) |", flush=True)  # fmt: skip
    compiles = [e.runner.compiles_since_warmup for e in engines.values()]
    print(f"compilations after warm-up: {sum(compiles)}")


if __name__ == "__main__":
    common.run(main)
