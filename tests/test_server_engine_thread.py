"""EngineThread: the one thread that owns the engine, driven from other threads."""

from __future__ import annotations

import queue
import threading

import pytest
from flax import nnx

from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.engine import Engine
from mlx_sched.serve.request import SamplingParams
from mlx_sched.server.engine_thread import (
    Accepted,
    Delta,
    EngineThread,
    Overloaded,
    Rejected,
    Submission,
    Unavailable,
)
from models import ModelConfig, Transformer

CFG = ModelConfig(
    vocab_size=264, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128
)
SERVE = ServeConfig(page_size=16, num_pages=64, max_seqs=16, token_budget=64, slice_len=4)


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, nnx.Rngs(0))


@pytest.fixture
def thread(model):
    t = EngineThread(Engine(model, SERVE, warmup=False), max_waiting=4).start()
    yield t
    if t._thread.is_alive():
        t.shutdown(timeout_s=0)


def events_until_done(q: queue.Queue, rids: set[str]) -> list:
    out, open_ = [], set(rids)
    while open_:
        ev = q.get(timeout=60)
        out.append(ev)
        if isinstance(ev, Delta) and ev.finished:
            open_.discard(ev.request_id)
    return out


def test_submit_streams_the_engines_tokens(thread, model):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    q: queue.Queue = queue.Queue()
    subs = [Submission(f"r{i}", p, SamplingParams(max_tokens=9)) for i, p in enumerate(prompts)]
    thread.submit(subs, q.put)
    assert q.get(timeout=60) == Accepted(("r0", "r1"))
    events = events_until_done(q, {"r0", "r1"})
    got = {
        rid: [t for e in events if e.request_id == rid for t in e.tokens[0]] for rid in ("r0", "r1")
    }
    reference = Engine(model, SERVE, warmup=False).generate(prompts, SamplingParams(max_tokens=9))
    assert [got["r0"], got["r1"]] == [o.outputs[0] for o in reference]
    assert thread.prompt_tokens == 8 and thread.generated_tokens == 18
    assert thread.active == 0 and thread.engine.pool.stats().in_use == 0


def test_a_rejected_submission_leaves_nothing_behind(thread):
    q: queue.Queue = queue.Queue()
    good = Submission("ok", [1, 2], SamplingParams(max_tokens=4))
    bad = Submission("bad", [1, 999], SamplingParams(max_tokens=4))  # outside the vocabulary
    thread.submit([good, bad], q.put)
    ev = q.get(timeout=60)
    assert isinstance(ev, Rejected) and ev.request_id == "bad" and "vocabulary" in ev.message
    state = thread.call(lambda e: (e.has_work(), e.pool.stats().in_use, e.requests["ok"].status))
    has_work, in_use, status = state.result(timeout=60)
    assert not has_work and in_use == 0 and status.value == "aborted"
    assert thread.waiting == 0 and thread.active == 0


def test_abort_frees_pages_and_ends_the_stream(thread):
    q: queue.Queue = queue.Queue()
    thread.submit([Submission("long", [1, 2, 3], SamplingParams(max_tokens=100))], q.put)
    assert isinstance(q.get(timeout=60), Accepted)
    thread.abort("long")
    events = events_until_done(q, {"long"})
    assert events[-1].finish_reasons == ["abort"]
    in_use = thread.call(lambda e: e.pool.stats().in_use).result(timeout=60)
    assert in_use == 0
    thread.abort("long")  # aborting a finished request is a no-op
    thread.abort("never-was")
    assert thread.call(lambda e: len(e.sched.running)).result(timeout=60) == 0


def test_overload_and_drain_refuse_before_queueing(thread):
    gate = threading.Event()
    thread.call(lambda e: gate.wait(60))  # hold the engine: submissions stay pending
    subs = [Submission(f"w{i}", [1], SamplingParams(max_tokens=1)) for i in range(4)]
    thread.submit(subs, lambda ev: None)
    with pytest.raises(Overloaded, match="bound 4"):
        thread.submit([Submission("one-more", [1], SamplingParams(max_tokens=1))], lambda ev: None)
    gate.set()
    thread.drain()
    with pytest.raises(Unavailable, match="shutting down"):
        thread.submit([Submission("late", [1], SamplingParams(max_tokens=1))], lambda ev: None)


def test_shutdown_waits_then_aborts_what_is_left(thread):
    q: queue.Queue = queue.Queue()
    thread.submit([Submission("slow", [1, 2], SamplingParams(max_tokens=120))], q.put)
    assert isinstance(q.get(timeout=60), Accepted)
    aborted = thread.shutdown(timeout_s=0)
    assert aborted in (0, 1)  # it may just have finished
    events = events_until_done(q, {"slow"})
    assert events[-1].finished and not thread._thread.is_alive()
    assert thread.engine.pool.stats().in_use == 0
    with pytest.raises(Unavailable):
        thread.call(lambda e: None).result(timeout=1)


def test_an_engine_failure_ends_every_request_and_refuses_new_ones(thread):
    def broken_step():
        raise RuntimeError("device lost")

    thread.call(lambda e: setattr(e, "step", broken_step)).result(timeout=60)
    q: queue.Queue = queue.Queue()
    thread.submit([Submission("victim", [1, 2], SamplingParams(max_tokens=50))], q.put)
    assert isinstance(q.get(timeout=60), Accepted)
    events = events_until_done(q, {"victim"})
    assert "device lost" in (events[-1].error or "")
    assert not thread.alive and "device lost" in thread.failure
    with pytest.raises(Unavailable, match="failed"):
        thread.submit([Submission("after", [1], SamplingParams(max_tokens=1))], q.put)
