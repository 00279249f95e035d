"""The S-LoRA experiment's runs (experiments/slora.py): adapters, the trace, the three modes,
the table and the plot."""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import time

import numpy as np
from flax import nnx

from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.engine import Engine
from mlx_sched.serve.request import SamplingParams
from models import ModelConfig, Transformer, lora, lora_pool
from models.lora_config import LoraConfig


@dataclasses.dataclass(frozen=True)
class Req:
    arrival: float
    prompt: list[int]
    max_tokens: int
    adapter: str


def make_adapters(base, n: int, ranks, targets, seed: int = 0) -> dict[str, tuple]:
    """n random adapters (ranks alternating among `ranks`), as in-memory (LoraConfig,
    {(layer, target): (A, B)}) of the pool's layout."""
    _, layout = lora_pool.attach_pool(base, tuple(targets), 1, (1, 1, 1), packed=False)
    specs = lora_pool.pool_specs(layout)
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        r = ranks[i % len(ranks)]
        lcfg = LoraConfig(rank=r, alpha=2.0 * r, targets=tuple(targets))
        weights = {}
        for key, (sa, sb) in specs.items():
            sa, sb = (*sa[:-1], r), (r, *sb[1:])
            bound = 1.0 / np.sqrt(np.prod(sa[:-1]))
            a = rng.uniform(-bound, bound, sa).astype(np.float32)
            weights[key] = (a, (0.02 * rng.standard_normal(sb)).astype(np.float32))
        out[f"ad{i}"] = (lcfg, weights)
    return out


def make_trace(n_adapters: int, workload, vocab: int) -> list[Req]:
    w = workload
    rng = np.random.default_rng(w["seed"])
    n = w["requests"]
    arrivals = np.cumsum(rng.exponential(1.0 / w["rate"], n))
    plen = rng.integers(w["prompt_len"][0], w["prompt_len"][1] + 1, n)
    olen = rng.integers(w["output_len"][0], w["output_len"][1] + 1, n)
    which = rng.integers(0, n_adapters, n)
    return [
        Req(float(a), [int(t) for t in rng.integers(0, vocab, p)], int(o), f"ad{k}")
        for a, p, o, k in zip(arrivals, plen, olen, which, strict=True)
    ]


def _submit(engine, i: int, r: Req, t0: float, adapter: str | None) -> None:
    sp = SamplingParams(max_tokens=r.max_tokens, ignore_eos=True)
    engine.add_request(r.prompt, sp, f"r{i}", arrival=t0 + r.arrival, adapter=adapter)


def _idle(engine, trace, nxt, t0) -> None:
    if nxt < len(trace):
        time.sleep(min(0.02, max(0.0, t0 + trace[nxt].arrival - engine.clock())))


def serve_pool(engine, trace: list[Req]) -> float:
    """Online replay through an engine with an adapter pool; -> wall seconds."""
    t0, nxt = engine.clock(), 0
    while nxt < len(trace) or engine.has_work():
        while nxt < len(trace) and t0 + trace[nxt].arrival <= engine.clock():
            _submit(engine, nxt, trace[nxt], t0, trace[nxt].adapter)
            nxt += 1
        if engine.has_work():
            engine.step()
        else:
            _idle(engine, trace, nxt, t0)
    return engine.clock() - t0


def merged_weights(base, lcfg: LoraConfig, weights) -> dict:
    """{path: W + scale * A @ B} of every adapted projection (float32, host)."""
    out = {}
    for (layer, target), (a, b) in weights.items():
        attr, name, eq = lora.PROJECTIONS[target]
        w = np.asarray(getattr(getattr(base.layers[layer], attr), name)[...], np.float32)
        out["layers", layer, attr, name] = w + lcfg.scale * np.einsum(lora.split_eq(eq)[2], a, b)
    return out


def serve_merged(engine, base, adapters, trace: list[Req]) -> tuple[float, int]:
    """One adapter at a time, merged into the weights when the engine is empty; every waiting
    request of the current adapter joins. -> (wall seconds, weight switches)."""
    t0, nxt, current, switches = engine.clock(), 0, None, 0
    pending: collections.deque[int] = collections.deque()
    while nxt < len(trace) or pending or engine.has_work():
        while nxt < len(trace) and t0 + trace[nxt].arrival <= engine.clock():
            pending.append(nxt)
            nxt += 1
        if pending and not engine.has_work() and trace[pending[0]].adapter != current:
            current = trace[pending[0]].adapter
            engine.update_params(merged_weights(base, *adapters[current]))
            switches += 1
        for i in [i for i in pending if trace[i].adapter == current]:
            pending.remove(i)
            _submit(engine, i, trace[i], t0, None)
        if engine.has_work():
            engine.step()
        else:
            _idle(engine, trace, nxt, t0)
    return engine.clock() - t0, switches


def run_one(config, mode: str, n: int, base, adapters) -> dict:
    trace = make_trace(n, config.workload.to_dict(), config.model.vocab_size)
    serve = dict(config.serve.to_dict())
    if mode != "merged":
        lc = dict(max_rank=max(config.ranks), slots=config.slots, targets=config.targets)
        serve["lora"] = lc | {"paging": mode}
    engine = Engine(base, ServeConfig.from_dict(serve))
    switches = 0
    if mode == "merged":
        wall, switches = serve_merged(engine, base, adapters, trace)
    else:
        for name, src in adapters.items():
            engine.register_adapter(name, src)
        wall = serve_pool(engine, trace)
    s = engine.summary(wall)
    ad = s.get("adapters", {})
    return {
        "mode": mode,
        "adapters": n,
        "wall_s": wall,
        "output_tok_s": s["output_tok_s"],
        "ttft_p50": s["ttft"]["p50"],
        "ttft_p99": s["ttft"]["p99"],
        "peak_running": s["peak_running"],
        "loads": ad.get("loads", switches),
        "evictions": ad.get("evictions", 0),
        "compiles_after_warmup": engine.runner.compiles_since_warmup,
    }


def run_all(config, progress=print) -> dict:
    """Every (adapters, mode) point `config.repeats` times, the modes interleaved (the
    machine's load drifts); a row holds each figure's median over the repeats."""
    base = Transformer(ModelConfig.from_dict(config.model.to_dict()), nnx.Rngs(0))
    rows, runs = [], []
    for n in config.num_adapters:
        adapters = make_adapters(base, n, config.ranks, config.targets)
        by_mode = collections.defaultdict(list)
        for _ in range(config.repeats):
            for mode in config.modes.split(","):
                by_mode[mode].append(run_one(config, mode, n, base, adapters))
                runs.append(by_mode[mode][-1])
        for rs in by_mode.values():
            rows.append(
                {
                    k: rs[0][k]
                    if isinstance(rs[0][k], str)
                    else float(np.median([r[k] for r in rs]))
                    for k in rs[0]
                }
            )
            progress(_row(rows[-1]))
    return {"rows": rows, "runs": runs}


HEAD = (
    "| adapters | mode | output tok/s | TTFT P50 (s) | TTFT P99 (s) | loads / switches "
    "| evictions |"
)


def _row(r: dict) -> str:
    return (
        f"| {r['adapters']:.0f} | {r['mode']} | {r['output_tok_s']:.0f} | {r['ttft_p50']:.3f} "
        f"| {r['ttft_p99']:.3f} | {r['loads']:.0f} | {r['evictions']:.0f} |"
    )


def table(results: dict) -> str:
    return "\n".join([HEAD, "|---" * 7 + "|", *map(_row, results["rows"])])


def plot(results: dict, path: pathlib.Path) -> pathlib.Path:
    from mlx_sched.plotting import plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in dict.fromkeys(r["mode"] for r in results["rows"]):
        rows = [r for r in results["rows"] if r["mode"] == mode]
        n = [r["adapters"] for r in rows]
        ax1.plot(n, [r["output_tok_s"] for r in rows], "o-", label=mode)
        (line,) = ax2.plot(n, [r["ttft_p50"] for r in rows], "o-", label=f"{mode} P50")
        ax2.plot(n, [r["ttft_p99"] for r in rows], "x--", color=line.get_color(), label="P99")
    for ax, name in ((ax1, "output tokens / s"), (ax2, "TTFT (s)")):
        ax.set_xscale("log")
        ax.set_xlabel("adapters")
        ax.set_ylabel(name)
        ax.legend(fontsize=7)
    ax2.set_yscale("log")
    fig.suptitle("S-LoRA: one base model, many adapters (2 CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
