"""The runs of experiments/cotrain.py (no flags here: tests import it): the base model, the
trace, one co-serving run per mode and deferral bound, held-out loss per served version,
tables and plots."""

from __future__ import annotations

import itertools
import logging
import pathlib
import time

import numpy as np

from experiments import common
from mlx_sched.cotrain import CoServeConfig, CoServer, Tuner, TunerConfig
from mlx_sched.lab.workload import TraceRequest
from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.engine import Engine
from mlx_sched.train import data as data_lib
from mlx_sched.train import loop


def base_model(config, workdir: pathlib.Path):
    """The pre-trained MoE model (trained once, then restored from `config.base_dir`, or
    <workdir>/cotrain_base)."""
    section = {"model": config.model.to_dict(), "train": config.train.to_dict()}
    base = pathlib.Path(config.base_dir) if config.base_dir else workdir / "cotrain_base"
    trainer, params, loss = loop.train_from_config(section, base)
    logging.info("base model: held-out loss %.3f", loss)
    return trainer.model(params), trainer.corpus, float(loss)


def make_trace(config, corpus) -> list[TraceRequest]:
    """Poisson arrivals of prompts cut from the held-out text, outputs of random lengths."""
    w = config.workload
    rng = np.random.default_rng(w.seed)
    times, t = [], rng.exponential(1 / w.rate)
    while t < w.duration_s:
        times.append(float(t))
        t += rng.exponential(1 / w.rate)
    held = corpus.heldout
    out = []
    for t in times:
        n = int(rng.integers(w.prompt_len[0], w.prompt_len[1] + 1))
        start = int(rng.integers(0, len(held) - n))
        prompt = [int(x) for x in held[start : start + n]]
        out.append(TraceRequest(t, prompt, int(rng.integers(w.output_len[0], w.output_len[1] + 1))))
    return out


def batches(config, corpus):
    tc = config.tuner
    b = data_lib.Batcher(corpus.train, tc.batch_size, tc.seq_len, seed=1)
    return (b.batch(i) for i in itertools.count())


def run_one(config, model, corpus, trace, mode: str, deferral: float, train_s: float) -> dict:
    """One run on a fresh engine and tuner of `model` -> its summary, logs and held-out curve."""
    tuner = Tuner(model, TunerConfig.from_dict(config.tuner.to_dict()))
    engine = Engine(tuner.model(), ServeConfig(**config.serve.to_dict()))
    cfg = CoServeConfig(deferral_s=deferral, mode=mode, train_only_s=train_s)
    co = CoServer(engine, tuner, batches(config, corpus), cfg)
    t0 = time.perf_counter()
    with common.CpuMeter() as cpu:
        out = co.run(trace)
    out["other_cores"] = cpu.other_cores  # other processes' CPU use meanwhile (of 2 cores here)
    logging.info("%s (deferral %g): %.0f s", mode, deferral, time.perf_counter() - t0)
    held = data_lib.eval_batches(corpus.heldout, 8, config.tuner.seq_len, config.heldout_batches)

    def heldout(trainable):
        ms = [tuner.evaluate(b, "eval", trainable) for b in held]
        return {k: float(np.mean([m[k] for m in ms])) for k in ("ce",)} | {
            "load_imbalance": float(
                np.mean([m[k] for m in ms for k in m if k.endswith("load_imbalance")])
            )
        }

    start = co.train_log[0]["t0"] if co.train_log else 0.0
    if mode == "train_only":
        curve = [{"t": co.clock() - start, "version": tuner.version, **heldout(None)}]
    else:
        curve = [
            {"t": (u["t0"] - co._start) if u else 0.0, "version": v, **heldout(co.versions[v])}
            for v, u in [(0, None)] + [(u["version"], u) for u in co.updates]
        ]
    out["engine_compiles_after_warmup"] = engine.runner.compiles_since_warmup
    out["heldout"] = curve
    out["train_log"] = [_stats(r, "t0", co._start) for r in co.train_log]
    out["serve_log"] = [_stats(r, "t0", co._start) for r in co.serve_log]
    return out


def _stats(record: dict, key: str, start: float) -> dict:
    """A log record's time (from the run's start) and its router statistics, averaged over the
    MoE layers: load imbalance (max/mean), entropy, drops."""
    out = {"t": record[key] - start, "version": record.get("version")}
    for name in ("load_imbalance", "router_entropy", "dropped"):
        vals = [v for k, v in record.items() if k.endswith("/" + name)]
        if vals:
            out[name] = float(np.mean(vals))
    for k in ("loss", "ce", "requests", "steps"):
        if k in record:
            out[k] = record[k]
    return out


def run_all(config, workdir: pathlib.Path, progress=print) -> dict:
    wanted = [r for r in config.runs.split(",") if r]
    plan = []
    for name in wanted:
        if name == "serve_only":
            plan.append(("serve_only", "serve_only", 0.0))
        elif name == "strict":
            plan.append(("strict", "coserve", 0.0))
        elif name == "deferral":
            plan += [(f"deferral_{d:g}", "coserve", float(d)) for d in config.deferrals]
        elif name != "train_only":
            raise ValueError(f"unknown run '{name}'; known: serve_only,train_only,strict,deferral")
    model, corpus, base_loss = base_model(config, workdir)
    trace = make_trace(config, corpus)
    results = {"base_heldout_ce": base_loss, "requests": len(trace), "runs": {}}
    walls = []
    for label, mode, d in plan:
        r = run_one(config, model, corpus, trace, mode, d, 1.0)
        results["runs"][label] = r
        walls.append(r["wall_s"])
        progress(f"{label}: {_row(label, r)}")
    if "train_only" in wanted:
        train_s = float(np.median(walls)) if walls else config.workload.duration_s
        r = run_one(config, model, corpus, trace, "train_only", 0.0, train_s)
        results["runs"]["train_only"] = r
        progress(f"train_only: {_row('train_only', r)}")
    return results


def _row(label: str, r: dict) -> str:
    s = r["serving"]
    ttft = s.get("ttft", {})
    tpot = s.get("tpot", {})

    def ms(d, k):
        return f"{1e3 * d[k]:,.0f}" if d.get(k) is not None else "–"

    ce = r["heldout"][-1]["ce"] if r["heldout"] else float("nan")
    return (
        f"| {label} | {r['train_steps']} | {r['train_steps_per_min']:.0f} | "
        f"{s.get('finished', 0)} | {ms(ttft, 'p50')} / {ms(ttft, 'p99')} | {ms(tpot, 'p50')} | "
        f"{r['updates']} | {ce:.3f} | {r.get('other_cores', 0):.2f} |"
    )


def table(results: dict) -> str:
    head = (
        "| run | tuning steps | steps / min | served | TTFT P50 / P99 ms | TPOT P50 ms | "
        "router updates | held-out CE after | other cores busy |\n"
        "|---|---:|---:|---:|---|---:|---:|---:|---:|"
    )
    rows = [_row(k, r) for k, r in results["runs"].items()]
    return "\n".join([head, *rows])


def plots(results: dict, workdir: pathlib.Path) -> list[pathlib.Path]:
    from mlx_sched.plotting import plt

    runs = results["runs"]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, r in runs.items():
        ttft = r["serving"].get("ttft", {}).get("p99")
        if ttft is not None:
            ax[0].scatter(1e3 * ttft, r["train_steps_per_min"], label=label)
            ax[0].annotate(label, (1e3 * ttft, r["train_steps_per_min"]), fontsize=7)
        if label == "train_only":
            ax[0].axhline(r["train_steps_per_min"], ls=":", c="gray", label="train_only")
    ax[0].set_xlabel("TTFT P99 (ms)")
    ax[0].set_ylabel("router tuning steps / min")
    ax[0].set_title("FineInfer: tuning vs serving latency")
    for label, r in runs.items():
        if r["mode"] == "coserve" or label == "serve_only":
            h = r["heldout"]
            ax[1].step([p["t"] for p in h], [p["ce"] for p in h], where="post", label=label)
    ax[1].set_xlabel("s")
    ax[1].set_ylabel("held-out CE of the served routers")
    ax[1].set_title("routers tuned while serving")
    ax[1].legend(fontsize=7)
    for label in [k for k in runs if k.startswith("deferral")][-1:]:
        r = runs[label]
        tl = [p for p in r["train_log"] if "load_imbalance" in p]
        sl = [p for p in r["serve_log"] if "load_imbalance" in p]
        ax[2].plot([p["t"] for p in tl], [p["load_imbalance"] for p in tl], label="tuning batches")
        ax[2].plot(
            [p["t"] for p in sl], [p["load_imbalance"] for p in sl], "o-", label="served traffic"
        )
        ax[2].set_title(f"router load max/mean ({label})")
    ax[2].set_xlabel("s")
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    path = workdir / "cotrain.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
