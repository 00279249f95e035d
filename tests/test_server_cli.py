"""From training to text in one step: experiments.train, then experiments.generate and
experiments.serve on the run's folder; a SIGTERM with a request in flight exits 0."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys

import httpx
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
PROMPT = "def "


def run(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_train_then_generate_then_serve(tmp_path):
    run_dir = tmp_path / "run"
    run(
        "experiments.train",
        "--config=experiments/configs/lm.py:runlocal",
        f"--workdir={run_dir}",
        "--config.train.steps=20",
    )
    printed = run(
        "experiments.generate",
        f"--checkpoint={run_dir}",
        f"--prompt={PROMPT}",
        "--max_tokens=24",
    )
    assert printed.startswith(f"== {run_dir.name}\n{PROMPT}")
    generated = printed.split("\n", 1)[1][len(PROMPT) :].rstrip("\n")

    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "experiments.serve",
            f"--checkpoint={run_dir}",
            "--config=experiments/configs/serve.py:runlocal",
            "--port=0",
            f"--workdir={tmp_path / 'serve'}",
        ],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = server.stdout.readline()
        url = re.search(r"at (http://\S+) ", line).group(1)
        body = {"model": run_dir.name, "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()
        assert r["choices"][0]["text"] == generated  # the same greedy text as generate's
        stream = body | {"max_tokens": 150, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=stream, timeout=120) as resp:
            lines = resp.iter_lines()
            first = next(x for x in lines if x.startswith("data: "))
            server.send_signal(signal.SIGTERM)  # a request is in flight
            rest = [x for x in lines if x.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"  # it was allowed to finish
        chunks = [json.loads(x[6:]) for x in [first, *rest[:-1]]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert server.wait(timeout=120) == 0
        assert "server stopped" in server.stdout.read()
    finally:
        if server.poll() is None:
            server.kill()
