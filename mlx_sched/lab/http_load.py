"""Replaying a trace against the OpenAI-compatible server over HTTP, timed at the client
(`experiments.loadgen` is its command line; `experiments.bench_http` uses it).

Each request of the trace (`lab.workload` JSONL: arrival time, prompt token ids,
output length) is sent at its arrival time as a streaming `/v1/completions` call
(greedy, `ignore_eos`, so it produces exactly its output length, as the in-process
replay does), and timed at the client: TTFT = first chunk with tokens - send time;
every token of a chunk gets the chunk's arrival time (as the engine stamps every
token of a step with the step's end), so TPOT, ITL and E2E are defined exactly as in
`serve.metrics`. Imports no JAX: it runs as its own light process.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse

import httpx

from mlx_sched.lab.workload import TraceRequest
from mlx_sched.serve import metrics


async def post_stream(host: str, port: int, path: str, body: dict):
    """POST `body` and yield (arrival time, SSE data payload) per event: a minimal HTTP/1.1
    client (chunked responses), so that the instrument costs little CPU on a machine it
    shares with the server. Raises RuntimeError on a status other than 200."""
    raw = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(raw)}\r\nConnection: close\r\n\r\n".encode()
            + raw
        )
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        chunked = b"transfer-encoding: chunked" in head.lower()
        if status != 200:
            raise RuntimeError(f"http {status}: {(await reader.read()).decode(errors='replace')}")
        buf = b""
        while True:
            if chunked:
                size = int((await reader.readuntil(b"\r\n")).strip() or b"0", 16)
                if size == 0:
                    break
                data = (await reader.readexactly(size + 2))[:-2]
            else:
                data = await reader.read(1 << 16)
                if not data:
                    break
            now = time.perf_counter()
            buf += data
            *events, buf = buf.split(b"\n\n")
            for e in events:
                if e.startswith(b"data: "):
                    yield now, e[6:]
    finally:
        writer.close()


def count_tokens(payload: bytes) -> int:
    """Token ids in one chunk (`return_token_ids`), without parsing the whole JSON."""
    total, at = 0, payload.find(b'"token_ids":[')
    while at >= 0:
        end = payload.index(b"]", at)
        ids = payload[at + 13 : end].strip()
        total += ids.count(b",") + 1 if ids else 0
        at = payload.find(b'"token_ids":[', end)
    return total


async def one(url: str, model: str, r: TraceRequest, i: int) -> dict:
    parsed = urllib.parse.urlsplit(url)
    body = {
        "model": model,
        "prompt": r.prompt,
        "max_tokens": r.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
        "user": r.client,
        "priority": r.priority,
    }
    base = {"id": f"r{i}", "prompt_len": len(r.prompt), "preemptions": 0, "client": r.client}
    sent = time.perf_counter()
    times: list[float] = []
    try:
        async for now, payload in post_stream(
            parsed.hostname, parsed.port or 80, "/v1/completions", body
        ):
            if payload == b"[DONE]":
                break
            if payload.startswith(b'{"error"'):
                return base | {"status": "error", "output_len": len(times), "error": payload}
            times += [now] * count_tokens(payload)
    except (RuntimeError, OSError) as e:
        return base | {"status": "failed", "output_len": 0, "error": str(e)}
    out = base | {"status": "finished", "output_len": len(times), "send": sent}
    if times:
        out |= {
            "ttft": times[0] - sent,
            "e2e": times[-1] - sent,
            "tpot": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0,
            "itl": [b - a for a, b in zip(times[:-1], times[1:], strict=True)],
            "normalized_latency": (times[-1] - sent) / len(times),
            "last": times[-1],
        }
    return out


async def replay_http(
    url: str, trace: list[TraceRequest], model: str = "", time_scale: float = 1.0
) -> tuple[list[dict], float]:
    """Send every request at its arrival time; (per-request records, wall seconds from the
    first send to the last token)."""
    if not model:
        async with httpx.AsyncClient() as client:
            model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
    t0 = time.perf_counter()

    async def at_arrival(i, r):
        delay = r.arrival * time_scale - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        return await one(url, model, r, i)

    records = await asyncio.gather(*(at_arrival(i, r) for i, r in enumerate(trace)))
    ends = [r["last"] for r in records if "last" in r]
    wall = (max(ends) if ends else time.perf_counter()) - t0
    return list(records), wall


def summarize(records: list[dict], wall_s: float) -> dict:
    """The client-side summary (the keys of `serve.metrics.summarize`, plus request/s)."""
    done = sum(r["status"] == "finished" for r in records)
    return metrics.summarize(records, [], wall_s) | {"request_s": done / wall_s}


def table(summary: dict) -> str:
    """Throughput and latency percentiles, as a client sees them."""
    rows = [
        ("requests finished", f"{summary['finished']}/{summary['requests']}"),
        ("requests/s", f"{summary['request_s']:.2f}"),
        ("output tokens/s", f"{summary['output_tok_s']:.1f}"),
    ]
    for key in ("ttft", "tpot", "itl", "e2e"):
        p = summary[key]
        rows.append(
            (
                f"{key} p50 / p90 / p99 (ms)",
                " / ".join(f"{1e3 * p[q]:.1f}" for q in ("p50", "p90", "p99")),
            )
        )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
