"""Where a serving step's time goes: the 44M Llama of bench_llama, decode and mixed steps.

  python -m experiments.profile_engine                  # float32 and bfloat16
  python -m experiments.profile_engine --dtypes=bfloat16 --batch=64

For a decode iteration of B sequences (context ~`--context`) and a mixed step with a
`--prefill`-token chunk, it times, in one process, best of `--reps`:

- the engine's real step (device time from the step records, and its host time);
- the same step's parts as separate jitted programs on the same weights and shapes: all
  the linear layers (q, k, v, o, gate, up, down of every layer), the output head, paged
  attention of every layer (the kernel the engine uses), sampling;
- the memory-bandwidth floor: the bytes of weights one iteration reads, over the bandwidth of
  a large reduction measured in the same process, and the matmul FLOP rate.

The parts do not add up to the step exactly (the step fuses elementwise work between them);
the remainder is shown as "other".
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments import common

_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "compute dtypes")
_BATCH = flags.DEFINE_integer("batch", 32, "decoding sequences")
_CONTEXT = flags.DEFINE_integer("context", 192, "context length of each decoding sequence")
_PREFILL = flags.DEFINE_integer("prefill", 512, "tokens of the mixed step's prefill chunk")
_REPS = flags.DEFINE_integer("reps", 10, "repetitions (best is reported, and the median)")
_SLICE = flags.DEFINE_integer("slice_len", 1, "decode iterations per call in the real step")


def timeit(fn, reps: int) -> tuple[float, float]:
    jax.block_until_ready(fn())
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return min(ts), float(np.median(ts))


def bandwidth(reps: int) -> float:
    """GB/s of a sum over 512 MiB (one read of each byte)."""
    x = jnp.ones((128 << 20,), jnp.float32)
    f = jax.jit(jnp.sum)
    best, _ = timeit(lambda: f(x), reps)
    return x.nbytes / best / 1e9


def profile(dtype: str, B: int, ctx: int, prefill: int, reps: int, slice_len: int) -> dict:
    import dataclasses

    from flax import nnx

    from experiments.llama44m import MODEL, serve_config
    from mlx_sched.serve import sampling
    from mlx_sched.serve.engine import Engine
    from mlx_sched.serve.request import SamplingParams
    from models import ModelConfig, Transformer, native_kernels

    model = Transformer(ModelConfig(**{**MODEL, "dtype": dtype}), nnx.Rngs(0))
    cfg = serve_config("default", dtype)
    cfg = dataclasses.replace(cfg, slice_len=slice_len, max_seqs=max(64, B))
    engine = Engine(model, cfg)
    rng = np.random.default_rng(0)
    for _ in range(B):
        engine.add_request(
            list(map(int, rng.integers(3, 32000, ctx))), SamplingParams(max_tokens=500)
        )
    while any(r.seqs[0].remaining != 1 for r in engine.sched.running) or engine.sched.waiting:
        engine.step()
    recs = []
    for _ in range(reps):
        engine.step()
        recs.append(engine.step_records[-1])
    step_dev = min(r.device_s / r.iters for r in recs)
    step_host = float(np.median([r.host_s / r.iters for r in recs]))

    runner = engine.runner
    params = runner.params
    cd = jnp.dtype(model.cfg.compute_dtype)
    ws = []
    for blk in params["layers"].values():
        a, m = blk["attn"], blk["mlp"]
        D = MODEL["d_model"]
        ws += [a["wq"][...].reshape(D, -1), a["wk"][...].reshape(D, -1)]
        ws += [a["wv"][...].reshape(D, -1), a["wo"][...].reshape(-1, D)]
        ws += [m["w_gate"][...], m["w_up"][...], m["w_down"][...]]
    embed = params["embed"][...]
    xs = {n: jnp.ones((B, n), cd) for n in {w.shape[0] for w in ws}}

    @jax.jit
    def linears(xs, ws):  # every output is returned, so XLA computes every column
        return [
            jnp.einsum("td,df->tf", xs[w.shape[0]], w, preferred_element_type=jnp.float32)
            for w in ws
        ]

    @jax.jit
    def head(x, e):
        return jnp.einsum("td,vd->tv", x, e, preferred_element_type=jnp.float32)

    t_lin, _ = timeit(lambda: linears(xs, ws), reps)
    x = xs[MODEL["d_model"]]
    t_head, _ = timeit(lambda: head(x, embed), reps)
    logits = head(x, embed)
    samp = jax.jit(lambda lg: sampling.argmax(lg))
    t_samp, _ = timeit(lambda: samp(logits), reps)

    seqs = [s for r in engine.sched.running for s in r.live_seqs][:B]
    W = runner.W
    table = np.zeros((B, W), np.int32)
    for i, s in enumerate(seqs):
        table[i, : len(s.pages)] = s.pages
    kv_len = np.asarray([s.num_computed + 1 for s in seqs], np.int32)
    H, X = MODEL["n_heads"], MODEL["d_model"] // MODEL["n_heads"]
    q = jnp.ones((B, H, X), cd)
    if runner.kernel.native:

        @jax.jit
        def attn(q, k, v, t, n):
            return sum(
                native_kernels.paged_decode(q, k, v, t, n, layer).sum()
                for layer in range(MODEL["n_layers"])
            )
    else:
        from models.paged_attention import paged_attention
        from models.patterns import DenseCausal

        @jax.jit
        def attn(q, k, v, t, n):
            pat = DenseCausal()
            return sum(
                paged_attention(q[:, None], k, v, t, (n - 1)[:, None], n, pat, 8, layer).sum()
                for layer in range(MODEL["n_layers"])
            )

    t_attn, _ = timeit(lambda: attn(q, runner.k, runner.v, table, kv_len), reps)

    flops = 2 * B * (sum(w.size for w in ws) + embed.size)
    weight_bytes = (sum(w.size for w in ws) + embed.size) * cd.itemsize
    bw = bandwidth(reps)
    parts = {"linear layers": t_lin, "output head": t_head, "paged attention": t_attn,
             "sampling": t_samp}  # fmt: skip
    return {
        "dtype": dtype,
        "batch": B,
        "context": ctx,
        "step_device_ms": 1e3 * step_dev,
        "step_host_ms": 1e3 * step_host,
        "parts_ms": {k: 1e3 * v for k, v in parts.items()},
        "other_ms": 1e3 * (step_dev - sum(parts.values())),
        "weights_mb": weight_bytes / 1e6,
        "bandwidth_gb_s": bw,
        "bandwidth_floor_ms": 1e3 * weight_bytes / bw / 1e9,
        "matmul_gflop_s": flops / (t_lin + t_head) / 1e9,
        "native_kernel": runner.kernel.native,
    }


def main(argv):
    del argv
    rows = [
        profile(d, _BATCH.value, _CONTEXT.value, _PREFILL.value, _REPS.value, _SLICE.value)
        for d in _DTYPES.value
    ]
    print(f"\ndecode iteration of {_BATCH.value} sequences at context ~{_CONTEXT.value}, "
          f"44M Llama, best of {_REPS.value}")  # fmt: skip
    print("| dtype | step device ms | host ms | linear | head | attention | sampling | other "
          "| weights MB | GB/s | bandwidth floor ms | matmul GFLOP/s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = r["parts_ms"]
        print(
            f"| {r['dtype']} | {r['step_device_ms']:.1f} | {r['step_host_ms']:.1f} "
            f"| {p['linear layers']:.1f} | {p['output head']:.1f} | {p['paged attention']:.1f} "
            f"| {p['sampling']:.1f} | {r['other_ms']:.1f} | {r['weights_mb']:.0f} "
            f"| {r['bandwidth_gb_s']:.1f} | {r['bandwidth_floor_ms']:.1f} "
            f"| {r['matmul_gflop_s']:.0f} |"
        )


if __name__ == "__main__":
    common.run(main)
