"""An online load generator for the OpenAI-compatible server: replay a trace over HTTP.

  python -m experiments.loadgen --url=http://127.0.0.1:8000 --trace=runs/bench_http/trace.jsonl

Each request is sent at its arrival time as a streaming completion and timed at the
client (`mlx_sched.lab.http_load`). Prints the summary table; `--out` writes it (and
the per-request records) as JSON. Imports no JAX: it runs as its own light process.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import sys

from absl import app, flags

from mlx_sched.lab.http_load import replay_http, summarize, table
from mlx_sched.lab.workload import load_trace

_URL = flags.DEFINE_string("url", "http://127.0.0.1:8000", "the server")
_TRACE = flags.DEFINE_string("trace", None, "trace JSONL (lab.workload.save_trace)")
_MODEL = flags.DEFINE_string("model", "", "model name (default: the server's only model)")
_OUT = flags.DEFINE_string("out", "", "write the summary and records here (JSON)")
_TIME_SCALE = flags.DEFINE_float("time_scale", 1.0, "multiply arrival times by this")


def main(argv):
    del argv
    if not _TRACE.value:
        print("error: --trace is required", file=sys.stderr)
        sys.exit(2)
    trace = load_trace(_TRACE.value)
    records, wall = asyncio.run(replay_http(_URL.value, trace, _MODEL.value, _TIME_SCALE.value))
    summary = summarize(records, wall)
    failed = [r for r in records if r["status"] != "finished"]
    print(
        f"== {len(trace)} requests over HTTP to {_URL.value} in {wall:.1f} s "
        f"({summary['request_s']:.2f} req/s); {len(failed)} failed"
    )
    print(table(summary))
    if _OUT.value:
        pathlib.Path(_OUT.value).write_text(
            json.dumps({"summary": summary, "records": records}, default=str, indent=1)
        )


if __name__ == "__main__":
    app.run(main)
