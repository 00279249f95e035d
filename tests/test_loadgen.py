"""The HTTP load generator (`lab.http_load`, `experiments.loadgen`) against a live server, and
`experiments.bench_http` end to end (slow)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys

import pytest
from flax import nnx

from mlx_sched.lab import http_load as loadgen
from mlx_sched.lab.workload import TraceRequest, save_trace
from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.engine import Engine
from mlx_sched.server import text as text_lib
from mlx_sched.server.app import App, Server, ServerSettings
from mlx_sched.train import data
from models import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "payload,n",
    [
        (b'{"choices":[{"text":"ab","token_ids":[1,2]}]}', 2),
        (b'{"choices":[{"token_ids":[7]},{"token_ids":[3, 4, 5]}]}', 4),
        (b'{"choices":[{"text":"","token_ids":[]}]}', 0),
        (b'{"choices":[{"text":"x"}],"usage":null}', 0),
    ],
)
def test_count_tokens_of_a_chunk(payload, n):
    assert loadgen.count_tokens(payload) == n
    assert n == sum(len(c.get("token_ids", [])) for c in json.loads(payload)["choices"])


def _serve(max_waiting: int):
    cfg = ModelConfig(
        vocab_size=264, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=128
    )
    serve = ServeConfig(page_size=8, num_pages=64, max_seqs=8, token_budget=64, eos_token=data.EOS)
    engine = Engine(Transformer(cfg, nnx.Rngs(0)), serve)
    settings = ServerSettings(model_name="lg", max_waiting=max_waiting)
    return Server(App(engine, text_lib.ByteTokenizerText(), settings), "127.0.0.1", 0,
                  log_level="warning").start_thread()  # fmt: skip


@pytest.fixture(scope="module")
def server():
    """A server that refuses a third waiting request (503)."""
    s = _serve(max_waiting=2)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def roomy_server():
    """A server that admits everything these tests send: how many requests wait at once
    depends on the machine's speed, and a refusal is not what the timing tests check."""
    s = _serve(max_waiting=64)
    yield s
    s.stop()


def test_replay_over_http_times_every_token(roomy_server):
    trace = [
        TraceRequest(arrival=0.02 * i, prompt=list(b"hello world")[: 3 + i], max_tokens=4 + i)
        for i in range(5)
    ]
    records, wall = asyncio.run(loadgen.replay_http(roomy_server.url, trace))
    assert [r["status"] for r in records] == ["finished"] * 5
    # ignore_eos: exactly max_tokens each, counted from the streamed token ids
    assert [r["output_len"] for r in records] == [r.max_tokens for r in trace]
    for r in records:
        assert 0 < r["ttft"] <= r["e2e"] <= wall
        assert len(r["itl"]) == r["output_len"] - 1 and all(x >= 0 for x in r["itl"])
    summary = loadgen.summarize(records, wall)
    assert summary["finished"] == 5 and summary["request_s"] == pytest.approx(5 / wall)
    table = loadgen.table(summary)
    assert re.search(r"requests finished +5/5", table)
    assert re.search(r"ttft p50 / p90 / p99 \(ms\) +[\d.]+ / [\d.]+ / [\d.]+", table)


def test_replay_records_refused_requests_as_failed(server):
    """More waiting requests than the server admits (max_waiting=2): the refused ones are
    'failed' records (503), the rest finish."""
    trace = [TraceRequest(arrival=0.0, prompt=[65] * 40, max_tokens=32) for _ in range(16)]
    records, _ = asyncio.run(loadgen.replay_http(server.url, trace, model="lg"))
    statuses = {r["status"] for r in records}
    assert statuses == {"finished", "failed"}
    assert all("http 503" in r["error"] for r in records if r["status"] == "failed")


def test_loadgen_command_writes_its_summary(server, tmp_path):
    trace = [TraceRequest(arrival=0.0, prompt=[66, 67], max_tokens=3)]
    save_trace(trace, tmp_path / "t.jsonl")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.loadgen",
            f"--url={server.url}",
            f"--trace={tmp_path / 't.jsonl'}",
            f"--out={tmp_path / 'o.json'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "== 1 requests over HTTP" in out.stdout and "0 failed" in out.stdout
    saved = json.loads((tmp_path / "o.json").read_text())
    assert saved["summary"]["finished"] == 1 and saved["records"][0]["output_len"] == 3


def test_loadgen_without_a_trace_is_an_error():
    out = subprocess.run(
        [sys.executable, "-m", "experiments.loadgen"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and "--trace is required" in out.stderr


@pytest.mark.slow
def test_bench_http_reports_the_overhead_against_the_goals(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.bench_http",
            "--config=experiments/configs/serve.py:runlocal",
            f"--workdir={tmp_path}",
            "--rounds=1",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("HTTP / in-process output tokens/s:") == 2
    saved = json.loads((tmp_path / "bench_http.json").read_text())
    assert set(saved["verdict"]) == {"online", "saturated"}
    for runs in saved["results"].values():
        (ours,), (http,) = runs["in_process"], runs["http"]
        assert http["finished"] == ours["finished"] == ours["requests"]
        assert http["output_tokens"] == ours["output_tokens"]
