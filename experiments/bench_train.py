"""Training throughput: tokens/s and achieved FLOP/s as a fraction of this machine's matmul peak.

  python -m experiments.bench_train                      # default lm config, f32
  python -m experiments.bench_train --dtype=bfloat16 --steps=10

The train step's FLOPs come from XLA's `compiled.cost_analysis()`; the peak is
the best square-matmul FLOP/s measured in the same process (best of N), so
the fraction is a ratio taken under the same machine load.
With --xla_variants the whole measurement is repeated in subprocesses under
alternative XLA:CPU flag sets (XLA flags are fixed per process).
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags

_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
_STEPS = flags.DEFINE_integer("steps", 8, "timed steps (after one warm-up step)")
_BATCH = flags.DEFINE_integer("batch_size", 16, "global batch")
_SEQ = flags.DEFINE_integer("seq_len", 256, "sequence length")
_OUT = flags.DEFINE_string("out", None, "optional JSON output path")
_VARIANTS = flags.DEFINE_bool("xla_variants", False, "also run under alternative XLA:CPU flags")

XLA_VARIANTS = {
    "default": "",
    "eigen_dots": "--xla_cpu_use_xnnpack=false --xla_cpu_experimental_ynn_fusion_type=",
}


def matmul_peak(dtype, sizes=(512, 1024, 2048), repeats=5) -> float:
    """Best FLOP/s of a jitted square matmul (float32 accumulation)."""
    import jax
    import jax.numpy as jnp

    best = 0.0
    for n in sizes:
        a = jnp.ones((n, n), dtype)
        f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
        f(a, a).block_until_ready()
        for _ in range(repeats):
            t = time.perf_counter()
            f(a, a).block_until_ready()
            best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def measure(dtype: str, steps: int, batch: int, seq: int) -> dict:
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from experiments.configs import lm
    from mlx_sched.train import loop
    from models import ModelConfig, Transformer

    c = lm.get_config("default")
    cfg = ModelConfig.from_dict({**c.model.to_dict(), "dtype": dtype})
    tc = loop.TrainConfig.from_dict({**c.train.to_dict(), "batch_size": batch, "seq_len": seq})
    tx = loop.make_optimizer(tc)
    graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)), nnx.Param)
    opt = tx.init(params)
    step = jax.jit(functools.partial(loop.train_step, graphdef, tx, 0), donate_argnums=(0, 1))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, seq + 1)), jnp.int32)
    compiled = step.lower(params, opt, tokens, jnp.int32(0)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    flops = float(cost["flops"])
    params, opt, m = step(params, opt, tokens, jnp.int32(0))
    jax.block_until_ready(m)
    times = []
    for i in range(steps):
        t = time.perf_counter()
        params, opt, m = step(params, opt, tokens, jnp.int32(i + 1))
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    peak = matmul_peak(jnp.float32 if dtype == "float32" else jnp.bfloat16)
    best, median = min(times), float(np.median(times))
    return {
        "dtype": dtype,
        "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)),
        "tokens_per_step": batch * seq,
        "step_s_best": best,
        "step_s_median": median,
        "tokens_per_s_best": batch * seq / best,
        "tokens_per_s_median": batch * seq / median,
        "step_gflop": flops / 1e9,
        "achieved_gflops_best": flops / best / 1e9,
        "matmul_peak_gflops": peak / 1e9,
        "fraction_of_peak": flops / best / peak,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def report(name: str, r: dict) -> str:
    return (
        f"| {name} | {r['dtype']} "
        f"| {r['tokens_per_s_best']:,.0f} ({r['tokens_per_s_median']:,.0f}) "
        f"| {r['step_gflop']:.1f} | {r['achieved_gflops_best']:.1f} "
        f"| {r['matmul_peak_gflops']:.1f} | {100 * r['fraction_of_peak']:.0f}% |"
    )


def main(argv):
    del argv
    if os.environ.get("_BENCH_CHILD"):
        r = measure(_DTYPE.value, _STEPS.value, _BATCH.value, _SEQ.value)
        print("RESULT " + json.dumps(r))
        return
    variants = XLA_VARIANTS if _VARIANTS.value else {"default": XLA_VARIANTS["default"]}
    results = {}
    for name, xla in variants.items():
        env = {**os.environ, "_BENCH_CHILD": "1", "XLA_FLAGS": xla}
        out = subprocess.run(
            [sys.executable, "-m", "experiments.bench_train", *sys.argv[1:]],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")][-1]
        results[name] = json.loads(line[len("RESULT ") :])
    print(
        "| XLA flags | dtype | train tokens/s best (median) | GFLOP/step | achieved GFLOP/s "
        "| matmul peak GFLOP/s | fraction of peak |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(report(name, r))
    first = next(iter(results.values()))
    print(
        f"\nmodel {first['params']:,} params, {first['tokens_per_step']} tokens/step, "
        f"{_STEPS.value} timed steps"
    )
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
