"""HTTP serving overhead: the same trace through the in-process engine and over HTTP.

  python -m experiments.bench_http                                      # serve.py:online
  python -m experiments.bench_http --config=experiments/configs/serve.py:runlocal --rounds=1

For each round and each of two traces — the config's online trace (Poisson
arrivals at `workload.rate`) and the same requests all at t = 0 (saturated: the
throughput a server can give) — the trace is served twice, each time by a fresh,
warmed-up engine with the same settings:

- in process: `lab.replay` adds each request at its arrival time and drives the
  engine; metrics from the engine's timestamps;
- over HTTP: the OpenAI-compatible server (`experiments.serve`'s App, in this
  process) and the load generator (`experiments.loadgen`) in its own process, which
  sends each request at its arrival time as a streaming completion and times it at
  the client.

Reports requests/s, output tokens/s and TTFT / TPOT / ITL / E2E percentiles of
both, the HTTP/in-process throughput ratio and the TTFT P50 difference (medians
over rounds), against the goals (< 5% throughput, < 5 ms TTFT P50).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import statistics
import subprocess
import sys

from absl import flags
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file(
    "config", common.config_path("serve", "online"), "serving config", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/bench_http", "where the trace and JSON go")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "rounds of (in-process, HTTP) per trace")
_TRACES = flags.DEFINE_list("traces", ["online", "saturated"], "which traces to serve")

GOAL_THROUGHPUT = 0.05  # HTTP may lose at most 5% of the in-process throughput
GOAL_TTFT_MS = 5.0  # and add at most 5 ms to TTFT P50


def in_process(model, config, trace) -> dict:
    from experiments import serving
    from mlx_sched.lab.replay import replay

    engine = serving.make_engine(model, config)
    wall = replay(engine, trace, online=True)
    summary = engine.summary(wall)
    return summary | {"request_s": summary["finished"] / wall}


def over_http(model, config, trace_path: pathlib.Path, out: pathlib.Path) -> dict:
    from experiments import serving
    from mlx_sched.server import text
    from mlx_sched.server.app import App, Server, ServerSettings

    tokenizer = text.load_tokenizer(None, model.cfg.vocab_size)
    engine = serving.make_engine(model, config, history=1000)
    settings = ServerSettings(model_name="bench", max_waiting=1 << 20)
    server = Server(App(engine, tokenizer, settings), "127.0.0.1", 0, log_level="warning")
    server.start_thread()
    try:
        cmd = [
            sys.executable,
            "-m",
            "experiments.loadgen",
            f"--url={server.url}",
            f"--trace={trace_path}",
            f"--out={out}",
        ]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    finally:
        server.stop()
    return json.loads(out.read_text())["summary"]


def main(argv):
    del argv
    from experiments import serving
    from mlx_sched.lab import http_load, workload
    from mlx_sched.train.data import load_corpus

    config = _CONFIG.value
    workdir = common.require_workdir(_WORKDIR.value)
    model = serving.load_model(config)
    corpus = load_corpus().heldout if model.cfg.vocab_size >= 259 else None
    online = serving.make_trace(model, config, corpus)
    traces = {
        "online": online,
        "saturated": [dataclasses.replace(r, arrival=0.0) for r in online],
    }
    traces = {k: v for k, v in traces.items() if k in _TRACES.value}
    rate = config.workload.rate if config.workload.online else None
    results: dict[str, dict[str, list]] = {}
    for name, trace in traces.items():
        path = workdir / f"trace_{name}.jsonl"
        workload.save_trace(trace, path)
        runs = results[name] = {"in_process": [], "http": []}
        for r in range(_ROUNDS.value):
            logging.info("%s round %d: in process", name, r + 1)
            runs["in_process"].append(in_process(model, config, trace))
            logging.info("%s round %d: over HTTP", name, r + 1)
            runs["http"].append(over_http(model, config, path, workdir / f"http_{name}.json"))
    lines = [
        f"== HTTP vs in process, {len(online)} requests ({serving.devices_note()}), "
        f"median of {_ROUNDS.value} rounds"
    ]
    verdict = {}
    for name, runs in results.items():
        head = f"{name} (Poisson {rate}/s)" if name == "online" and rate else name
        lines.append(f"\n-- {head}")
        for mode in ("in_process", "http"):
            lines.append(f"{mode}:\n{http_load.table(runs[mode][-1])}")
        ratio = statistics.median(
            h["output_tok_s"] / p["output_tok_s"]
            for p, h in zip(runs["in_process"], runs["http"], strict=True)
        )
        dttft = statistics.median(
            1e3 * (h["ttft"]["p50"] - p["ttft"]["p50"])
            for p, h in zip(runs["in_process"], runs["http"], strict=True)
        )
        verdict[name] = {"throughput_ratio": ratio, "ttft_p50_delta_ms": dttft}
        lines.append(
            f"HTTP / in-process output tokens/s: {ratio:.3f} "
            f"({'meets' if ratio >= 1 - GOAL_THROUGHPUT else 'misses'} the goal of > "
            f"{1 - GOAL_THROUGHPUT:.2f}); TTFT P50 difference {dttft:+.1f} ms "
            f"({'meets' if dttft < GOAL_TTFT_MS else 'misses'} the goal of < {GOAL_TTFT_MS} ms)"
        )
    print("\n".join(lines))
    (workdir / "bench_http.json").write_text(
        json.dumps({"results": results, "verdict": verdict}, indent=1, default=str)
    )
    print(f"\nJSON in {workdir / 'bench_http.json'}")


if __name__ == "__main__":
    common.run(main)
