"""The OpenAI-compatible HTTP server, over real HTTP on loopback with the `openai` client.

A tiny byte-level model serves from a background thread; every greedy answer is
compared with the in-process engine's output for the same prompt.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
from flax import nnx
from prometheus_client.parser import text_string_to_metric_families

from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.engine import Engine
from mlx_sched.serve.request import SamplingParams
from mlx_sched.server import text as text_lib
from mlx_sched.server.app import App, Server, ServerSettings
from mlx_sched.train import data
from models import ModelConfig, Transformer

MODEL = "tiny"
CFG = ModelConfig(
    vocab_size=264, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=256
)
SERVE = ServeConfig(
    page_size=16, num_pages=256, max_seqs=16, token_budget=64, slice_len=4, eos_token=data.EOS
)
PROMPTS = ["def main():\n", "import os\n", "class A:", "x = [1, 2"]


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, nnx.Rngs(0))


@pytest.fixture(scope="module")
def tokenizer():
    return text_lib.load_tokenizer(None, CFG.vocab_size)


def start_server(model, tokenizer, serve=SERVE, **settings) -> Server:
    app = App(Engine(model, serve), tokenizer, ServerSettings(model_name=MODEL, **settings))
    return Server(app, "127.0.0.1", 0, log_level="warning").start_thread()


@pytest.fixture(scope="module")
def server(model, tokenizer):
    s = start_server(model, tokenizer)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def reference(model, tokenizer):
    """Greedy text of the in-process engine (its own engine, same model and settings)."""
    engine = Engine(model, SERVE, warmup=False)
    cache = {}

    def greedy(prompt_ids: list[int], max_tokens: int) -> str:
        key = (tuple(prompt_ids), max_tokens)
        if key not in cache:
            out = engine.generate([prompt_ids], SamplingParams(max_tokens=max_tokens))[0]
            cache[key] = tokenizer.decode(out.outputs[0])
        return cache[key]

    return greedy


def metrics(server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def wait_idle(server, timeout_s: float = 30.0) -> dict[str, float]:
    """Metrics once no request runs and no KV page is held (the engine retires aborted
    requests between steps)."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = metrics(server)
        idle = m["mlx_sched_requests_running"] == 0 and m["mlx_sched_requests_waiting"] == 0
        if idle and m["mlx_sched_kv_pages_in_use"] == 0:
            return m
        assert time.monotonic() < deadline, f"the engine did not go idle: {m}"
        time.sleep(0.05)


# -- endpoints -------------------------------------------------------------------------------


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = httpx.get(f"{server.url}/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_greedy_completions_equal_the_in_process_engine(client, tokenizer, reference):
    for prompt in PROMPTS:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        (choice,) = r.choices
        assert choice.text == reference(tokenizer.encode(prompt), 24)
        assert r.usage.prompt_tokens == len(tokenizer.encode(prompt))
        assert r.usage.completion_tokens <= 24
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert choice.finish_reason in ("length", "stop")


def test_streamed_chunks_concatenate_to_the_whole_text(client, tokenizer, reference):
    for prompt in PROMPTS[:2]:
        chunks = list(
            client.completions.create(
                model=MODEL,
                prompt=prompt,
                max_tokens=32,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == reference(tokenizer.encode(prompt), 32)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
        finals = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finals[-1] in ("length", "stop") and all(f is None for f in finals[:-1])


def test_chat_renders_the_documented_template(client, tokenizer, reference):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi é"}]
    ids = tokenizer.encode_chat(messages)
    expected = reference(ids, 20)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    assert r.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True
    )
    parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(parts) == expected


def test_prompt_forms_and_choice_order(client, tokenizer, reference):
    ids = tokenizer.encode(PROMPTS[0])
    r = client.completions.create(model=MODEL, prompt=PROMPTS[:3], max_tokens=8, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c, p in zip(r.choices, PROMPTS[:3], strict=True):
        assert c.text == reference(tokenizer.encode(p), 8)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == reference(ids, 8)
    r = client.completions.create(model=MODEL, prompt=[ids, ids[:3]], max_tokens=8, temperature=0)
    assert [c.text for c in r.choices] == [reference(ids, 8), reference(ids[:3], 8)]


def test_n_samples_and_seed_reproducibility(client):
    def ask(seed, n=2):
        r = client.completions.create(
            model=MODEL, prompt="abc", max_tokens=12, temperature=1.0, n=n, seed=seed
        )
        assert [c.index for c in r.choices] == list(range(n))
        return [c.text for c in r.choices]

    first = ask(7)
    assert ask(7) == first  # same seed, same samples
    others = [ask(s) for s in (8, 9, 10)]
    assert any(o != first for o in others)
    assert len(set(first)) == 2 or len(first[0]) == 0  # two different samples of one prompt


def test_stop_strings_end_the_text_exactly(client, tokenizer, reference):
    full = reference(tokenizer.encode(PROMPTS[1]), 48)
    stop = full[10:13]  # a string the greedy continuation contains
    assert stop
    expected = full[: full.index(stop)]
    r = client.completions.create(
        model=MODEL, prompt=PROMPTS[1], max_tokens=48, temperature=0, stop=[stop, "\x00never"]
    )
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    stream = client.completions.create(
        model=MODEL, prompt=PROMPTS[1], max_tokens=48, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected
    # the request ended at the stop string: its pages are free again
    assert r.usage.completion_tokens < 48


def test_logprobs_of_the_chosen_tokens(client):
    r = client.completions.create(
        model=MODEL, prompt="ab", max_tokens=10, temperature=0, logprobs=1
    )
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == r.usage.completion_tokens
    assert all(x <= 1e-6 for x in lp.token_logprobs)
    zero = client.completions.create(
        model=MODEL, prompt="ab", max_tokens=10, temperature=0, logprobs=0
    )
    assert zero.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs)
    stream = client.completions.create(
        model=MODEL, prompt="ab", max_tokens=10, temperature=0, logprobs=0, stream=True
    )
    streamed = [x for c in stream if c.choices for x in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs)
    assert "".join(lp.tokens).startswith(r.choices[0].text[:1])
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(t.logprob <= 1e-6 for t in content)


def test_64_concurrent_streaming_clients(server, tokenizer, reference):
    prompts = [f"{PROMPTS[i % 4]}{i}" for i in range(64)]
    expected = [reference(tokenizer.encode(p), 16) for p in prompts]

    async def one(client, prompt):
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True
        )
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def all_of_them():
        async with openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300
        ) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    assert asyncio.run(all_of_them()) == expected
    wait_idle(server)


def hold(server) -> threading.Event:
    """Hold the engine thread (between two steps) until the returned event is set."""
    gate = threading.Event()
    server.app.thread.call(lambda engine: gate.wait(60))
    return gate


def test_a_client_that_disconnects_frees_its_pages(server):
    before = wait_idle(server)["mlx_sched_requests_total{status=aborted}"]
    body = {"model": MODEL, "prompt": "x", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
        assert metrics(server)["mlx_sched_kv_pages_in_use"] > 0
        gate = hold(server)  # so the request cannot finish before the server sees the close
    deadline = time.monotonic() + 30
    while server.app.thread.queued_commands < 1:  # the abort, once the server saw the close
        assert time.monotonic() < deadline
        time.sleep(0.01)
    gate.set()
    m = wait_idle(server)  # the request was aborted and its pages freed
    assert m["mlx_sched_requests_total{status=aborted}"] == before + 1
    # the same for a non-streaming request whose client gives up before it is even accepted
    gate = hold(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body | {"stream": False}, timeout=0.5)
    gate.set()
    m = wait_idle(server)
    assert m["mlx_sched_requests_total{status=aborted}"] == before + 2


BAD = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"model": "other", "prompt": "x"}, 400, "model"),
    ({"model": MODEL}, 400, "prompt"),
    ({"model": MODEL, "prompt": 5}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "y" * 300, "max_tokens": 1}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "n": 9}, 400, "n"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": MODEL, "prompt": [1, 2, 9999]}, 400, "prompt"),
    ({"model": MODEL, "prompt": ""}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ({"model": MODEL, "prompt": "x", "presence_penalty": 1.0}, 400, "presence_penalty"),
    ({"model": MODEL, "prompt": "x", "logprobs": 5}, 400, "logprobs"),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_input_is_an_error_naming_the_field(server, body, status, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(
        f"{server.url}/v1/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"


def test_bad_chat_input_and_oversized_bodies(server, client):
    url = f"{server.url}/v1/chat/completions"
    for body, param in (
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": [{"role": "bot", "content": "x"}]}, "messages.0.role"),
        ({"model": MODEL, "messages": [{"role": "user"}]}, "messages.0.content"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": []}, "tools"),
    ):
        r = httpx.post(url, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    huge = {"model": MODEL, "prompt": "x" * (2 << 20)}
    r = httpx.post(f"{server.url}/v1/completions", json=huge)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model=MODEL, prompt="z" * 250, max_tokens=10)
    # nothing of the refused requests reached the engine; the server still serves
    assert wait_idle(server)["mlx_sched_kv_pages_in_use"] == 0
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=2).choices


def test_overload_answers_503_with_retry_after(model, tokenizer):
    s = start_server(model, tokenizer, max_waiting=1)
    try:
        gate = hold(s)
        body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
        first = threading.Thread(
            target=httpx.post,
            args=(f"{s.url}/v1/completions",),
            kwargs={"json": body, "timeout": 60},
        )
        first.start()
        deadline = time.monotonic() + 10
        while s.app.thread.waiting < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = httpx.post(f"{s.url}/v1/completions", json=body)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "overloaded"
        gate.set()
        first.join()
        assert httpx.post(f"{s.url}/v1/completions", json=body).status_code == 200
    finally:
        s.stop()


def test_metrics_parse_and_count(server, client):
    m0 = wait_idle(server)
    client.completions.create(model=MODEL, prompt="count me", max_tokens=5, temperature=0)
    m = wait_idle(server)
    assert m["mlx_sched_requests_total{status=finished}"] == (
        m0["mlx_sched_requests_total{status=finished}"] + 1
    )
    assert m["mlx_sched_ttft_seconds_count"] == m0["mlx_sched_ttft_seconds_count"] + 1
    assert m["mlx_sched_prompt_tokens_total"] == m0["mlx_sched_prompt_tokens_total"] + 8
    assert m["mlx_sched_generation_tokens_total"] >= m0["mlx_sched_generation_tokens_total"] + 1
    assert m["mlx_sched_compilations_after_warmup"] == 0
    assert m["mlx_sched_kv_pages_total"] == SERVE.num_pages - 1
    for name in (
        "mlx_sched_requests_swapped",
        "mlx_sched_sequences_running",
        "mlx_sched_prefix_cache_hit_rate",
        "mlx_sched_preemptions_total",
        "mlx_sched_tpot_seconds_bucket{le=+Inf}",
        "mlx_sched_e2e_seconds_sum",
        "mlx_sched_http_requests_total{code=200,endpoint=completions}",
    ):
        assert name in m, name


def test_profile_endpoint(server, tmp_path):
    r = httpx.post(f"{server.url}/admin/profile", json={"seconds": 0.3})
    assert r.status_code == 200
    busy = httpx.post(f"{server.url}/admin/profile", json={"seconds": 0.3})
    assert busy.status_code == 409
    path = r.json()["path"]
    deadline = time.monotonic() + 30
    while server.app.profiler.active is not None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    import pathlib

    assert any(p.is_file() for p in pathlib.Path(path).rglob("*"))
    assert httpx.post(f"{server.url}/admin/profile", json={"seconds": -1}).status_code == 400


def test_profile_endpoint_refuses_other_hosts(server):
    from starlette.testclient import TestClient

    with TestClient(server.app.starlette) as tc:  # its client address is "testclient"
        r = tc.post("/admin/profile", json={"seconds": 1})
    assert r.status_code == 403


def test_shutdown_finishes_requests_in_flight(model, tokenizer):
    s = start_server(model, tokenizer, shutdown_timeout_s=60)
    body = {"model": MODEL, "prompt": "a", "max_tokens": 60, "temperature": 0, "stream": True}
    texts = []

    def consume():
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=120) as r:
            texts.append([line for line in r.iter_lines() if line])

    t = threading.Thread(target=consume)
    t.start()
    while s.app.thread.active < 1:
        time.sleep(0.01)
    url = s.url
    s.stop()  # what SIGTERM does: drain, let the stream finish, stop
    t.join()
    assert texts[0][-1] == "data: [DONE]"
    assert json.loads(texts[0][-2][6:])["choices"][0]["finish_reason"] in ("length", "stop")
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"{url}/v1/completions", json=body)
