"""Where a serving step's time goes: the 44M Llama of bench_llama, decode and mixed steps.

  python -m experiments.profile_engine                  # float32 and bfloat16
  python -m experiments.profile_engine --dtypes=bfloat16 --batch=64

For a decode iteration of B sequences (context ~`--context`) and a mixed step (the same B
decodes plus the prefill chunk of a new `--prefill`-token prompt), it times, in one process,
best of `--reps`:

- the engine's real step (device time from the step records, and its host time);
- the same step's parts as separate jitted programs on the same weights (packed for the
  native matmul when the engine packs them) and shapes: all the linear layers (q, k, v, o,
  gate, up, down of every layer), the output head, paged decode attention of every layer
  (the kernel the engine uses), sampling; for the mixed step the linear layers and the head
  at its rows, the rest (attention of the chunk and of the decodes, elementwise) as one;
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
_PREFILL = flags.DEFINE_integer("prefill", 480, "prompt tokens of the mixed step's new request")
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
    from models.layers import dot

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
    params = runner.params  # as the engine runs them: packed for the native matmul or not
    cd = jnp.dtype(model.cfg.compute_dtype)
    uses = []  # (einsum, weight) of every projection
    for blk in params["layers"].values():
        a, m = blk["attn"], blk["mlp"]
        uses += [("td,dhx->thx", a["wq"][...]), ("td,dkx->tkx", a["wk"][...])]
        uses += [("td,dkx->tkx", a["wv"][...]), ("thx,hxd->td", a["wo"][...])]
        uses += [("td,df->tf", m["w_gate"][...]), ("td,df->tf", m["w_up"][...])]
        uses += [("tf,fd->td", m["w_down"][...])]
    embed = params["embed"][...]
    D, H = MODEL["d_model"], MODEL["n_heads"]
    x_in = {"td": jnp.ones((B, D), cd), "tf": jnp.ones((B, MODEL["d_ff"]), cd),
            "thx": jnp.ones((B, H, D // H), cd)}  # fmt: skip

    @jax.jit
    def linears(ws):  # every output is returned, so XLA computes every column
        return [dot(eq, x_in[eq.split(",")[0]], w, cd) for eq, w in zip(eqs, ws, strict=True)]

    @jax.jit
    def head(x, e):
        return dot("td,vd->tv", x, e, cd)

    eqs = [eq for eq, _ in uses]
    ws = [w for _, w in uses]
    t_lin, _ = timeit(lambda: linears(ws), reps)
    x = x_in["td"]
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

    # a mixed step: the same decodes plus one prefill chunk of a new request (max_tokens=1: it
    # finishes at its first token, so every repetition sees the same batch)
    mixed = []
    for _ in range(reps + 1):
        engine.add_request(
            list(map(int, rng.integers(3, 32000, prefill))), SamplingParams(max_tokens=1)
        )
        while engine.sched.waiting or any(
            r.seqs[0].num_computed == 0 for r in engine.sched.running
        ):
            engine.step()
            if engine.step_records[-1].kind == "mixed":
                mixed.append(engine.step_records[-1])
    rec = min(mixed[1:], key=lambda r: r.device_s)
    D_m, _, Tp = rec.shape
    rows = D_m * 1 + Tp
    xm = {"td": jnp.ones((rows, D), cd), "tf": jnp.ones((rows, MODEL["d_ff"]), cd),
          "thx": jnp.ones((rows, H, D // H), cd)}  # fmt: skip

    @jax.jit
    def linears_m(ws):
        return [dot(eq, xm[eq.split(",")[0]], w, cd) for eq, w in zip(eqs, ws, strict=True)]

    t_lin_m, _ = timeit(lambda: linears_m(ws), reps)
    t_head_m, _ = timeit(lambda: head(jnp.ones((D_m + cfg.max_prefill_rows, D), cd), embed), reps)
    mixed_parts = {"linear layers": t_lin_m, "output head": t_head_m}

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
        "packed_matmuls": runner.packed_matmuls,
        "mixed": {
            "shape": rec.shape,
            "decodes": rec.num_decode,
            "prefill_tokens": rec.num_prefill_tokens,
            "step_device_ms": 1e3 * rec.device_s,
            "parts_ms": {k: 1e3 * v for k, v in mixed_parts.items()},
            "other_ms": 1e3 * (rec.device_s - sum(mixed_parts.values())),
            "matmul_gflop_s": 2 * rows * sum(w.size for w in ws) / t_lin_m / 1e9,
        },
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
    print(f"\nmixed step: {_BATCH.value} decodes + one prefill chunk of a {_PREFILL.value}-token "
          "prompt, best of the repetitions")  # fmt: skip
    print("| dtype | shape (D, L, Tp) | prefill tokens | step device ms | linear | head "
          "| attention + other | linear GFLOP/s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = r["mixed"]
        print(
            f"| {r['dtype']} | {tuple(m['shape'])} | {m['prefill_tokens']} "
            f"| {m['step_device_ms']:.1f} | {m['parts_ms']['linear layers']:.1f} "
            f"| {m['parts_ms']['output head']:.1f} | {m['other_ms']:.1f} "
            f"| {m['matmul_gflop_s']:.0f} |"
        )
    print(f"packed matmuls: {[r['packed_matmuls'] for r in rows]}")


if __name__ == "__main__":
    common.run(main)
