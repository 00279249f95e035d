"""A soak of the engine: a long stream under a small KV pool, every feature on, checked.

Requests have shared prefixes, a share of them ask for n > 1 samples, some are
sampled with seeds and some greedy, some carry stop tokens; about `abort_rate`
of them are aborted at random times, from the driving loop and from inside
output callbacks (of the request itself and of others). The pool is small, so
the engine preempts (recompute or swap) thousands of times.

Every request's output is checked against a reference engine with a pool large
enough never to preempt: outputs depend only on the request (greedy, or its own
seed), so they must be equal; an aborted request's output must be a prefix of
its reference. At the end: every page free, no host KV entries, no per-request
state left, and the process's RSS sampled at 10 / 50 / 100% of the stream.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.engine import Engine
from mlx_sched.serve.request import RequestError, SamplingParams

NEAR_TIE = 1e-4


@dataclasses.dataclass(frozen=True)
class SoakRequest:
    prompt: tuple[int, ...]
    sampling: SamplingParams
    abort_after: int  # abort once this many tokens are out (-1: never); 0: while waiting
    abort_in_callback: bool
    priority: int = 0


def make_requests(n: int, vocab: int, seed: int = 0, abort_rate: float = 0.1, max_new=24):
    """The soak's requests: shared prefixes, mixed lengths, n > 1, seeds, stops, aborts."""
    rng = np.random.default_rng(seed)
    prefixes = [list(map(int, rng.integers(0, vocab, int(rng.integers(8, 33))))) for _ in range(8)]
    out = []
    for _ in range(n):
        prompt = list(map(int, rng.integers(0, vocab, int(rng.integers(1, 24)))))
        if rng.random() < 0.5:
            prompt = prefixes[int(rng.integers(len(prefixes)))] + prompt
        sampled = rng.random() < 0.5
        sp = SamplingParams(
            max_tokens=int(rng.integers(1, max_new + 1)),
            temperature=float(rng.uniform(0.5, 1.2)) if sampled else 0.0,
            top_k=int(rng.integers(0, 40)) if sampled and rng.random() < 0.3 else 0,
            top_p=float(rng.uniform(0.7, 1.0)) if sampled and rng.random() < 0.3 else 1.0,
            n=int(rng.choice([2, 3])) if rng.random() < 0.2 else 1,
            seed=int(rng.integers(0, 2**31)),
            stop_tokens=(int(rng.integers(0, vocab)),) if rng.random() < 0.2 else (),
        )
        aborted = rng.random() < abort_rate
        after = int(rng.integers(0, sp.max_tokens)) if aborted else -1
        in_cb = aborted and rng.random() < 0.5
        out.append(SoakRequest(tuple(prompt), sp, after, in_cb, int(rng.random() < 0.2)))
    return out


def reference_outputs(model, cfg: ServeConfig, requests: list[SoakRequest]) -> list[list]:
    """Every request run to its end on an engine that never preempts (a big pool)."""
    need = max(len(r.prompt) + r.sampling.max_tokens for r in requests)
    pages = cfg.max_seqs * 3 * (-(-need // cfg.page_size)) + 1
    big = dataclasses.replace(cfg, num_pages=pages, policy="fcfs", policy_args={})
    engine = Engine(model, big)
    outs, chunk = [], 256
    for i in range(0, len(requests), chunk):
        part = requests[i : i + chunk]
        got = engine.generate([list(r.prompt) for r in part], [r.sampling for r in part])
        outs += [[tuple(o) for o in g.outputs] for g in got]
    assert sum(r.preemptions for r in engine.requests.values()) == 0
    return outs


def divergence_margin(model, prompt, sampling: SamplingParams, index: int, got, want) -> float:
    """How close the first differing token of `got` and `want` was to a tie, under a dense
    full-sequence forward: for greedy, |logit gap| / max |logit|; for sampling, the distance
    of the draw's uniform from the CDF boundary between the two tokens, as a share of the
    mass. A margin near float32 rounding (< 1e-4) means the two engines' logits, computed in
    different batch shapes, differ in their last bits at a near-tie: not a scheduling bug."""
    import jax
    import jax.numpy as jnp

    from mlx_sched.serve import sampling as sampling_lib

    j = next(i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b)
    ctx = list(prompt) + list(want[:j])
    logits = np.asarray(model(jnp.asarray([ctx]))[0, -1], np.float64)
    a, b = sorted((got[j], want[j]))
    if sampling.temperature == 0:
        return float(abs(logits[a] - logits[b]) / np.abs(logits).max())
    x = jnp.asarray(logits[None] / sampling.temperature, jnp.float32)
    x = sampling_lib.filter_top_k_top_p(
        x, jnp.asarray([sampling.top_k]), jnp.asarray([sampling.top_p], jnp.float32)
    )
    w = np.exp(np.asarray(x[0], np.float64) - float(np.max(x)))
    cdf = np.cumsum(w) / w.sum()
    key = sampling_lib.row_keys(
        jnp.asarray([sampling.seed]), jnp.asarray([index]), jnp.asarray([len(ctx)])
    )
    u = float(jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(key)[0])
    return float(np.abs(u - cdf[a:b]).min())


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@dataclasses.dataclass
class SoakResult:
    requests: int = 0
    finished: int = 0
    aborted: int = 0
    aborted_in_callback: int = 0
    preemptions: int = 0
    mismatches: int = 0  # outputs that differ from the reference, not at a near-tie
    near_ties: int = 0  # outputs that differ at a float32 near-tie (see divergence_margin)
    examples: list = dataclasses.field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    pages_in_use: int = -1
    host_kv_entries: int = -1
    leftover_state: dict = dataclasses.field(default_factory=dict)
    rss_mib: dict = dataclasses.field(default_factory=dict)  # % of the stream -> MiB


def soak(model, cfg: ServeConfig, requests, reference, in_flight: int = 48, seed: int = 1,
         progress=None) -> SoakResult:  # fmt: skip
    """Drive `requests` through an engine with `cfg`, keeping about `in_flight` requests in it;
    check each against `reference` as it ends."""
    rng = np.random.default_rng(seed)
    engine = Engine(model, cfg)
    res = SoakResult(requests=len(requests))
    index: dict[str, int] = {}
    live: set[str] = set()
    differing: list = []
    marks = {int(len(requests) * f): f"{int(100 * f)}%" for f in (0.1, 0.5, 1.0)}

    def settle(rid: str) -> None:
        """A request ended (finished or aborted): compare it with its reference, forget it."""
        live.discard(rid)
        req = engine.requests[rid]
        i = index.pop(rid)
        want = reference[i]
        got = [tuple(s.output) for s in req.seqs]
        if req.status.value == "finished":
            res.finished += 1
            ok = got == want
        else:
            res.aborted += 1
            # an aborted request may not have forked yet: compare the samples it has
            ok = len(got) <= len(want) and all(
                w[: len(g)] == g for g, w in zip(got, want[: len(got)], strict=True)
            )
        res.preemptions += req.preemptions
        if not ok:  # diagnosed after the stream, so the diagnosis does not touch the RSS
            res.mismatches += 1
            if len(differing) < 100:
                differing.append((i, got, want))
        done = res.finished + res.aborted
        if done in marks:
            res.rss_mib[marks[done]] = round(rss_mib(), 1)

    def abort(rid: str, in_callback: bool) -> None:
        if rid not in live or engine.requests[rid].is_finished:
            return  # (finished in this very step: settled when the step returns)
        engine.abort(rid)
        res.aborted_in_callback += in_callback
        settle(rid)

    def on_output(out) -> None:
        i = index.get(out.request_id)
        if i is None:
            return
        r = requests[i]
        if out.finished:
            return
        if r.abort_in_callback and 0 <= r.abort_after <= sum(map(len, out.outputs)):
            abort(out.request_id, True)
        elif r.abort_in_callback and rng.random() < 0.02 and len(live) > 1:
            abort(str(rng.choice(sorted(live))), True)  # another request, from this callback

    t0, nxt = time.perf_counter(), 0
    while nxt < len(requests) or engine.has_work():
        while nxt < len(requests) and len(live) < in_flight:
            r = requests[nxt]
            rid = engine.add_request(
                list(r.prompt), r.sampling, priority=r.priority, on_output=on_output
            )
            index[rid] = nxt
            live.add(rid)
            nxt += 1
            if r.abort_after == 0 and not r.abort_in_callback:
                abort(rid, False)  # aborted while waiting
        for out in engine.step():
            if out.finished and out.request_id in live:
                settle(out.request_id)
        res.steps += 1
        for rid in [rid for rid in live if rid in engine.requests]:  # the loop's own aborts
            r = requests[index[rid]]
            made = sum(len(s.output) for s in engine.requests[rid].seqs)
            if not r.abort_in_callback and 0 < r.abort_after <= made:
                abort(rid, False)
        if progress and res.steps % 500 == 0:
            progress(res.finished + res.aborted, len(requests))
    res.seconds = time.perf_counter() - t0
    for i, got, want in differing:
        r = requests[i]
        margins = [
            divergence_margin(model, r.prompt, r.sampling, k, g, w)
            for k, (g, w) in enumerate(zip(got, want, strict=False))
            if g != w[: len(g)]
        ]
        if max(margins) < NEAR_TIE:
            res.near_ties += 1
            res.mismatches -= 1
        elif len(res.examples) < 5:
            res.examples.append({"request": i, "margins": margins, "got": got, "want": want})
    res.pages_in_use = engine.pool.num_in_use
    res.host_kv_entries = len(engine.store)
    res.leftover_state = {
        "live requests": sum(not r.is_finished for r in engine.requests.values()),
        "kept finished requests (history)": len(engine.requests),
        "stop sets": len(engine._stops),
        "callbacks": len(engine._callbacks),
        "policy state": len(getattr(engine.policy, "state", {})),
        "waiting/running/swapped": len(engine.sched.waiting)
        + len(engine.sched.running)
        + len(engine.sched.swapped),
    }
    engine.pool.check()
    return res


def soak_model_config():
    """The small model the soak runs: cheap steps, varied greedy continuations."""
    from models import ModelConfig

    return ModelConfig(
        vocab_size=264,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=64,
        max_seq_len=128,
        init_std=0.3,
    )


def check(res: SoakResult) -> list[str]:
    """What went wrong, as sentences (empty: the soak passed)."""
    bad = []
    if res.mismatches:
        bad.append(f"{res.mismatches} outputs differ from the reference: {res.examples[:2]}")
    if res.finished + res.aborted != res.requests:
        bad.append(f"{res.requests - res.finished - res.aborted} requests never ended")
    if res.pages_in_use:
        bad.append(f"{res.pages_in_use} pages still in use")
    if res.host_kv_entries:
        bad.append(f"{res.host_kv_entries} host KV entries left")
    left = {k: v for k, v in res.leftover_state.items() if v and "history" not in k}
    if left:
        bad.append(f"per-request state left: {left}")
    return bad


__all__ = ["RequestError", "SoakResult", "check", "make_requests", "reference_outputs", "soak"]
