"""Dense vs Sparse Transformer attention: time, FLOPs and memory against sequence length.

  python -m experiments.bench_attention                         # n = 128 .. 16384, table + plot
  python -m experiments.bench_attention --lengths=512,1024 --repeats=2 --plot=/tmp/a.png

Writes the plot and every measurement as JSON under runs/bench_attention/ (--plot, --out),
never into docs/, whose copy of the plot is the README's figure.

One attention call (batch 1, --heads query heads, head_dim 64, float32) in
four forms: `dense` (the model's causal kernel), `strided` and `fixed` (the
efficient reshape/gather forms, both sub-patterns unioned in every head,
l = 2**ceil(log2(n) / 2) ~ sqrt(n), c = --summary), and `masked` (the strided
pattern as a dense n x n mask: what a mask costs). Each is timed as a
training step would use it, forward + backward (grads w.r.t. q, k, v), and
forward only; repetitions rotate over the forms so that load drift on a
shared machine hits all of them alike. Best and median of --repeats.

Memory is XLA's own account of the compiled forward + backward program
(`compiled.memory_analysis()`: temporaries + arguments + outputs), which is
deterministic; FLOPs are `compiled.cost_analysis()`. A form whose program
would need more than --max_gib is not run and is reported as such.
"""

from __future__ import annotations

import json
import math
import pathlib
import time

import numpy as np
from absl import app, flags

_LENGTHS = flags.DEFINE_list("lengths", "128,256,512,1024,2048,4096,8192,16384", "sequence lengths")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed repetitions per form (after a warm-up)")
_HEADS = flags.DEFINE_integer("heads", 1, "query heads (= kv heads)")
_SUMMARY = flags.DEFINE_integer("summary", 8, "c of the fixed pattern")
_FORMS = flags.DEFINE_list("forms", "dense,strided,fixed,masked", "forms to measure")
_MAX_GIB = flags.DEFINE_float("max_gib", 8.0, "skip a form whose program needs more memory")
RUNS = pathlib.Path("runs/bench_attention")  # never docs/: its copy is the README's figure
_OUT = flags.DEFINE_string("out", str(RUNS / "bench_attention.json"), "JSON output path")
_PLOT = flags.DEFINE_string("plot", str(RUNS / "sparse_attention_bench.png"), "log-log plot path")

X = 64


def stride_for(n: int) -> int:
    return 2 ** math.ceil(math.log2(n) / 2)


def make_forms(n: int, names: list[str], heads: int, summary: int) -> dict:
    """name -> attention function (q, k, v, pos) -> out, for sequences of length n."""
    from models.gathered_attention import reference_attention
    from models.patterns import DenseCausal
    from models.sparse_attention import Fixed, Strided

    l, H = stride_for(n), heads
    strided = Strided(l, H, "union")
    forms = {
        "dense": DenseCausal().full_attention,
        "strided": strided.full_attention,
        "fixed": Fixed(l, H, "union", min(summary, l)).full_attention,
        "masked": lambda q, k, v, pos: reference_attention(strided, q, k, v, pos),
    }
    return {name: forms[name] for name in names}


def compile_form(fn, n: int, H: int):
    """Jitted forward and forward+backward of one form, with XLA's cost and memory accounts."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    q, k, v, cot = (jnp.asarray(rng.normal(size=(1, n, H, X)), jnp.float32) for _ in range(4))
    pos = jnp.arange(n, dtype=jnp.int32)[None]
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, pos) * cot)
    train = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    fwd = jax.jit(lambda q, k, v: fn(q, k, v, pos)).lower(q, k, v).compile()
    mem = train.memory_analysis()
    cost = train.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    info = {
        "mem_mib": (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes)
        / 2**20,
        "gflop": float(cost.get("flops", float("nan"))) / 1e9,
    }
    return (lambda: train(q, k, v)), (lambda: fwd(q, k, v)), info


def timed(call) -> float:
    import jax

    t = time.perf_counter()
    jax.block_until_ready(call())
    return time.perf_counter() - t


def measure(
    n: int, names: list[str], heads=1, summary=8, repeats=5, max_gib=8.0
) -> dict[str, dict]:
    """One row per form at length n: times (ms), XLA memory (MiB), GFLOP."""
    compiled, out = {}, {}
    for name, fn in make_forms(n, names, heads, summary).items():
        train, fwd, info = compile_form(fn, n, heads)
        out[name] = {"n": n, "form": name, "l": stride_for(n), **info}
        if info["mem_mib"] > max_gib * 1024:
            out[name]["skipped"] = f"needs {info['mem_mib'] / 1024:.1f} GiB > --max_gib"
            continue
        timed(train), timed(fwd)  # warm-up
        compiled[name] = (train, fwd)
    times = {name: ([], []) for name in compiled}
    for _ in range(repeats):  # rotate over forms: drift hits all alike
        for name, (train, fwd) in compiled.items():
            times[name][0].append(timed(train))
            times[name][1].append(timed(fwd))
    for name, (t_train, t_fwd) in times.items():
        out[name].update(
            train_ms_best=1e3 * min(t_train),
            train_ms_median=1e3 * float(np.median(t_train)),
            fwd_ms_best=1e3 * min(t_fwd),
            fwd_ms_median=1e3 * float(np.median(t_fwd)),
        )
    return out


# ---------------------------------------------------------------------------
# Analysis: slopes, crossover, table, plot
# ---------------------------------------------------------------------------


def slope(rows: list[dict], key: str, min_n: int = 0) -> float:
    pts = [(r["n"], r[key]) for r in rows if key in r and r["n"] >= min_n and r[key] > 0]
    if len(pts) < 2:
        return float("nan")
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def crossover(dense: list[dict], sparse: list[dict], key: str) -> float | None:
    """Smallest n where sparse is faster than dense, interpolated in log-log (None: never)."""
    pairs = [
        (d["n"], np.log(s[key] / d[key]))
        for d, s in zip(dense, sparse, strict=True)
        if key in d and key in s
    ]
    if not pairs:
        return None
    if pairs[0][1] < 0:
        return float(pairs[0][0])  # faster already at the smallest length
    for (n0, r0), (n1, r1) in zip(pairs, pairs[1:], strict=False):
        if r0 >= 0 > r1:
            return float(np.exp(np.log(n0) + (np.log(n1) - np.log(n0)) * r0 / (r0 - r1)))
    return None


def table(rows: list[dict], names: list[str]) -> str:
    by = {(r["n"], r["form"]): r for r in rows}
    ns = sorted({r["n"] for r in rows})
    head = ["n", "l"] + [f"{f} fwd+bwd ms" for f in names] + [f"{f} MiB" for f in names]
    head += [f"{f} GFLOP" for f in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def t(r):
        if "skipped" in r:
            return "does not fit"
        return f"{r['train_ms_best']:.1f} ({r['train_ms_median']:.1f})"

    for n in ns:
        cells = [str(n), str(stride_for(n))]
        cells += [t(by[n, f]) for f in names]
        cells += [f"{by[n, f]['mem_mib']:.1f}" for f in names]
        cells += [f"{by[n, f]['gflop']:.2f}" for f in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], names: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in [
        (axes[0], "train_ms_best", "forward + backward time (ms, best)"),
        (axes[1], "mem_mib", "XLA memory, fwd + bwd (MiB)"),
    ]:
        for name in names:
            pts = [(r["n"], r[key]) for r in rows if r["form"] == name and key in r]
            if pts:
                ax.loglog(*zip(*pts, strict=True), "o-", label=name, lw=1.2, ms=4)
        ns = np.array(sorted({r["n"] for r in rows}), float)
        base = min(r[key] for r in rows if key in r and r["n"] == ns[0])
        for power, style in [(2.0, ":"), (1.5, "--")]:
            ax.loglog(ns, base * (ns / ns[0]) ** power, "k" + style, lw=0.8, label=f"n^{power:g}")
        ax.set_xlabel("sequence length n")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv):
    del argv
    import jax

    names = _FORMS.value
    rows = []
    for n in (int(x) for x in _LENGTHS.value):
        args = (_HEADS.value, _SUMMARY.value, _REPEATS.value, _MAX_GIB.value)
        for r in measure(n, names, *args).values():
            rows.append(r)
            print(json.dumps(r), flush=True)
    print(f"\njax {jax.__version__}, {jax.devices()[0].device_kind}, heads={_HEADS.value}, X={X}")
    print(table(rows, names))
    per = {f: [r for r in rows if r["form"] == f] for f in names}
    for f in names:
        s = [slope(per[f], k, 2048) for k in ("train_ms_best", "mem_mib", "gflop")]
        print(
            f"{f}: log-log slope over n >= 2048: time {s[0]:.2f}, memory {s[1]:.2f}, "
            f"FLOPs {s[2]:.2f} (all n: time {slope(per[f], 'train_ms_best'):.2f})"
        )
    if "dense" in per:
        for f in [f for f in names if f in ("strided", "fixed")]:
            for key in ("train_ms_median", "mem_mib"):
                x = crossover(per["dense"], per[f], key)
                print(f"crossover {f} vs dense ({key}): " + ("none" if x is None else f"{x:.0f}"))
    plot_path, out_path = pathlib.Path(_PLOT.value), pathlib.Path(_OUT.value)
    for path in (plot_path, out_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, names, str(plot_path))
    out_path.write_text(json.dumps(rows, indent=1))
    print(f"plot: {plot_path}\nJSON: {out_path}")


if __name__ == "__main__":
    app.run(main)
