"""Training throughput: f32 and bf16 tokens/s, and achieved FLOP/s as a fraction of this
machine's matmul peak.

  python -m experiments.bench_train                      # default lm config, f32 and bf16
  python -m experiments.bench_train --dtypes=bfloat16 --steps=10
  python -m experiments.bench_train --malloc=system      # glibc's default (page faults per step)

The train step's FLOPs come from XLA's `compiled.cost_analysis()`; the peak is
the best square-matmul FLOP/s of the same dtype (float32 accumulation: for
bf16 that is the AMX path). Each round times one train step of every dtype,
then one matmul of every size and dtype, all in one process: load from other
jobs on the machine then falls on the steps and the peaks alike, so the
fractions and the bf16/f32 ratio are comparisons within one run.
By default (`--malloc=retain`, as `experiments.train`) it runs with
`mlx_sched.train.memory.retain_freed_memory()` (glibc keeps freed blocks, so
XLA's per-step buffers stop page-faulting); `--malloc=system` is glibc's default.
With --xla_variants the whole measurement is repeated in subprocesses under
alternative XLA:CPU flag sets (XLA flags are fixed per process).
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags

_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "compute dtypes, in one run")
_STEPS = flags.DEFINE_integer("steps", 8, "timed rounds (after one warm-up step)")
_BATCH = flags.DEFINE_integer("batch_size", 16, "global batch")
_SEQ = flags.DEFINE_integer("seq_len", 256, "sequence length")
_OUT = flags.DEFINE_string("out", None, "optional JSON output path")
_VARIANTS = flags.DEFINE_bool("xla_variants", False, "also run under alternative XLA:CPU flags")
_MALLOC = flags.DEFINE_enum(
    "malloc", "retain", ["system", "retain"], "glibc's default, or retain_freed_memory()"
)

XLA_VARIANTS = {
    "default": "",
    "eigen_dots": "--xla_cpu_use_xnnpack=false --xla_cpu_experimental_ynn_fusion_type=",
}
PEAK_SIZES = (512, 1024, 2048)


def measure(dtypes: list[str], rounds: int, batch: int, seq: int) -> dict:
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from experiments.configs import lm
    from mlx_sched.train import loop
    from mlx_sched.train.steps import train_step
    from models import ModelConfig, Transformer

    c = lm.get_config("default")
    tc = loop.TrainConfig.from_dict({**c.train.to_dict(), "batch_size": batch, "seq_len": seq})
    tx = loop.make_optimizer(tc)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, seq + 1)), jnp.int32)
    steps, flops, state, params_count = {}, {}, {}, 0
    for dtype in dtypes:
        cfg = ModelConfig.from_dict({**c.model.to_dict(), "dtype": dtype})
        graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)), nnx.Param)
        opt = tx.init(params)
        step = jax.jit(functools.partial(train_step, graphdef, tx, 0), donate_argnums=(0, 1))
        steps[dtype] = step.lower(params, opt, tokens, jnp.int32(0)).compile()
        cost = steps[dtype].cost_analysis()
        flops[dtype] = float((cost[0] if isinstance(cost, list | tuple) else cost)["flops"])
        params_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        params, opt, m = steps[dtype](params, opt, tokens, jnp.int32(0))  # warm-up
        jax.block_until_ready(m)
        state[dtype] = (params, opt)
    matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    squares = {(d, n): jnp.ones((n, n), d) for d in dtypes for n in PEAK_SIZES}
    for a in squares.values():
        matmul(a, a).block_until_ready()
    times = {d: [] for d in dtypes}
    peaks = {d: 0.0 for d in dtypes}
    for i in range(rounds):
        for d in dtypes:
            t = time.perf_counter()
            params, opt, m = steps[d](*state[d], tokens, jnp.int32(i + 1))
            jax.block_until_ready(m)
            times[d].append(time.perf_counter() - t)
            state[d] = (params, opt)
        for (d, n), a in squares.items():
            t = time.perf_counter()
            matmul(a, a).block_until_ready()
            peaks[d] = max(peaks[d], 2 * n**3 / (time.perf_counter() - t))
    out = {}
    for d in dtypes:
        best, median = min(times[d]), float(np.median(times[d]))
        out[d] = {
            "dtype": d,
            "params": params_count,
            "tokens_per_step": batch * seq,
            "step_s_best": best,
            "step_s_median": median,
            "tokens_per_s_best": batch * seq / best,
            "tokens_per_s_median": batch * seq / median,
            "step_gflop": flops[d] / 1e9,
            "achieved_gflops_best": flops[d] / best / 1e9,
            "matmul_peak_gflops": peaks[d] / 1e9,
            "fraction_of_peak": flops[d] / best / peaks[d],
            "fraction_of_peak_median": flops[d] / median / peaks[d],
        }
    if "float32" in out and "bfloat16" in out:
        f32, bf16 = out["float32"], out["bfloat16"]
        out["bf16_over_f32"] = {
            "best": f32["step_s_best"] / bf16["step_s_best"],
            "median": f32["step_s_median"] / bf16["step_s_median"],
        }
    out["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    return out


def report(name: str, r: dict) -> str:
    return (
        f"| {name} | {r['dtype']} "
        f"| {r['tokens_per_s_best']:,.0f} ({r['tokens_per_s_median']:,.0f}) "
        f"| {r['step_gflop']:.1f} | {r['achieved_gflops_best']:.1f} "
        f"| {r['matmul_peak_gflops']:.1f} "
        f"| {100 * r['fraction_of_peak']:.0f}% ({100 * r['fraction_of_peak_median']:.0f}%) |"
    )


def main(argv):
    del argv
    if os.environ.get("_BENCH_CHILD"):
        if _MALLOC.value == "retain":
            from mlx_sched.train.memory import retain_freed_memory

            if not retain_freed_memory():
                print("warning: --malloc=retain needs glibc's mallopt; using the system's malloc")
        r = measure(_DTYPES.value, _STEPS.value, _BATCH.value, _SEQ.value)
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
        "| matmul peak GFLOP/s | fraction of peak best (median) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        for d in _DTYPES.value:
            print(report(name, r[d]))
    first = next(iter(results.values()))[_DTYPES.value[0]]
    print(
        f"\nmodel {first['params']:,} params, {first['tokens_per_step']} tokens/step, "
        f"{_STEPS.value} timed rounds, malloc={_MALLOC.value}"
    )
    for name, r in results.items():
        if "bf16_over_f32" in r:
            ratio = r["bf16_over_f32"]
            print(
                f"bf16/f32 train speed ({name}, same process): {ratio['best']:.2f}x best, "
                f"{ratio['median']:.2f}x median"
            )
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
