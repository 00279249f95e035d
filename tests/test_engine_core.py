"""The engine core: multi-token steps with rollback, KV movement as plan data, one budget and one
shape function, per-runner compile counts, ids instead of object identity."""

import dataclasses
from collections import Counter

import jax
import numpy as np
import pytest
from flax import nnx

from mlx_sched.lab.simulator import SimClock, SimRunner
from mlx_sched.serve import policies
from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.engine import Engine
from mlx_sched.serve.interface import StepRunner
from mlx_sched.serve.plan import StepPlan
from mlx_sched.serve.policies.base import Policy, register
from mlx_sched.serve.policies.fcfs import FCFS
from mlx_sched.serve.request import Request, SamplingParams
from mlx_sched.serve.shapes import Shape, all_shapes, shape_for
from models import ModelConfig, Transformer
from models import generate as reference
from models.errors import ConfigError

MAX_NEW = 12
BIG = dict(  # few compiled shapes: every engine of this file warms up in a few seconds
    page_size=4,
    num_pages=256,
    max_seqs=8,
    decode_buckets=(8,),
    token_budget=64,
    prefill_buckets=(64,),
    max_prefill_rows=2,
)


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(
        vocab_size=264,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=64,
        max_seq_len=96,
        init_std=0.3,  # varied greedy continuations, not one repeated token
    )
    return Transformer(cfg, nnx.Rngs(3))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    out = [list(map(int, rng.integers(0, 256, n))) for n in (5, 17, 9, 30, 3, 12)]
    out[5] = out[3][:16] + out[5]  # a shared prefix: prefix-cache hits
    return out


@pytest.fixture(scope="module")
def expected(model, prompts):
    return reference.generate(model, prompts, MAX_NEW)


class Drafting(FCFS):
    """FCFS whose decoding sequences first get draft tokens from `propose(seq)` (not registered:
    a test's own policy)."""

    name = "drafting_test"

    def __init__(self, cfg, propose):
        super().__init__(cfg)
        self.propose = propose

    def schedule(self, sched, now):
        for req in sched.running:
            for s in req.live_seqs:
                if s.remaining == 1:
                    s.draft = list(self.propose(s))
        return super().schedule(sched, now)


def with_policy(engine: Engine, policy: Policy) -> Engine:
    policy.bind(engine.sched)
    engine.policy = policy
    return engine


def truth(expected, prompts):
    """propose(seq) helpers from the reference continuations."""
    by_prompt = {tuple(p): e for p, e in zip(prompts, expected, strict=True)}

    def next_tokens(seq, k):
        done = seq.num_generated
        return by_prompt[tuple(seq.request.prompt)][done : done + k]

    return next_tokens


def cache_state(engine: Engine):
    """What the prefix cache and pool hold, independent of which page ids were used."""
    pool = engine.pool
    return (pool.num_in_use, pool.num_available, sorted(pool._page_of))


def seq_state(engine: Engine):
    return {
        s.id: (list(s.tokens), s.num_computed, len(s.pages))
        for r in engine.requests.values()
        for s in r.seqs
    }


# -- multi-token steps and rollback ---------------------------------------------------------


def test_rejected_drafts_leave_the_engine_as_if_never_computed(model, prompts, expected):
    """Every step, each decode also computes 3 wrong draft tokens; they are all rejected. After
    every step the engine equals one that never drafted: tokens, computed positions, pages per
    sequence, pages in use, and the prefix cache's contents."""
    nxt = truth(expected, prompts)
    wrong = lambda s: [(t + 1) % 256 for t in nxt(s, 3)]  # noqa: E731
    cfg = ServeConfig(**BIG, decode_widths=(1, 4))
    plain = Engine(model, cfg)
    spec = with_policy(Engine(model, cfg), Drafting(cfg, wrong))
    sp = SamplingParams(max_tokens=MAX_NEW)
    with jax.no_tracing(), jax.transfer_guard("disallow"):
        for step in range(200):
            if step < len(prompts):
                for e in (plain, spec):
                    e.add_request(prompts[step], sp, request_id=f"r{step}")
            if not (plain.has_work() or spec.has_work()):
                break
            plain.step()
            spec.step()
            assert seq_state(spec) == seq_state(plain), step
            assert cache_state(spec) == cache_state(plain), step
    verified = [s for s in spec.step_records if s.kind == "mixed" and s.shape[1] == 4]
    assert verified, "no step verified drafts"
    for i in range(len(prompts)):
        assert spec.requests[f"r{i}"].outputs()[0] == expected[i]
    spec.pool.check()
    assert spec.pool.num_in_use == 0 and spec.runner.compiles_since_warmup == 0


def test_correct_drafts_are_accepted_several_tokens_per_step(model, prompts, expected):
    nxt = truth(expected, prompts)
    cfg = ServeConfig(**BIG, decode_widths=(1, 2, 4))
    spec = with_policy(Engine(model, cfg), Drafting(cfg, lambda s: nxt(s, 3)))
    with jax.no_tracing():
        outs = spec.generate(prompts, SamplingParams(max_tokens=MAX_NEW))
    assert [o.outputs[0] for o in outs] == expected
    per_step = [  # tokens a sequence got from one step (they share its timestamp)
        n for o in outs for t in [o.request.seqs[0].token_times] for n in Counter(t).values()
    ]
    assert max(per_step) == 4  # 3 drafts + the bonus token
    assert len(spec.step_records) < len(prompts) + MAX_NEW
    spec.pool.check()
    assert spec.pool.num_in_use == 0 and spec.runner.compiles_since_warmup == 0


def test_sampled_output_is_unchanged_by_deterministic_drafts(model, prompts):
    """Sampling keys depend on (seed, sequence, position) only, so verifying a deterministic
    draft by sampling and comparing reproduces the undrafted samples exactly."""
    cfg = ServeConfig(**BIG, decode_widths=(1, 4))
    sps = [
        SamplingParams(max_tokens=MAX_NEW, temperature=0.8, top_p=0.95, seed=i) for i in range(6)
    ]
    plain = Engine(model, cfg)
    want = [o.outputs[0] for o in plain.generate(prompts, sps)]
    by_prompt = {tuple(p): w for p, w in zip(prompts, want, strict=True)}

    def half_right(seq):  # right, wrong, right: accepted up to the wrong one
        t = by_prompt[tuple(seq.request.prompt)][seq.num_generated : seq.num_generated + 3]
        return [x if i != 1 else (x + 7) % 256 for i, x in enumerate(t)]

    spec = with_policy(Engine(model, cfg), Drafting(cfg, half_right))
    assert [o.outputs[0] for o in spec.generate(prompts, sps)] == want
    spec.pool.check()


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_drafts_with_preemption_and_parallel_sampling(model, prompts, expected, preemption):
    """Drafting crossed with a pool small enough to preempt, and n = 2 requests."""
    nxt = truth(expected, prompts)
    propose = lambda s: nxt(s, 2) if s.index == 0 else [7, 7]  # noqa: E731
    cfg = ServeConfig(**{**BIG, "num_pages": 24}, decode_widths=(1, 3), preemption=preemption)
    spec = with_policy(Engine(model, cfg), Drafting(cfg, propose))
    sps = [SamplingParams(max_tokens=MAX_NEW, n=2 if i % 3 == 0 else 1) for i in range(6)]
    with jax.no_tracing():
        outs = spec.generate(prompts, sps)
    for i, o in enumerate(outs):
        assert all(out == expected[i] for out in o.outputs), i  # greedy: every sample the same
    assert sum(o.request.preemptions for o in outs) > 0
    spec.pool.check()
    assert spec.pool.num_in_use == 0 and len(spec.store) == 0


# -- KV movement is plan data ----------------------------------------------------------------


def test_policies_move_no_kv_and_swaps_travel_in_the_plan(model, prompts, expected):
    cfg = ServeConfig(**{**BIG, "num_pages": 20}, slice_len=2, preemption="swap")
    engine = Engine(model, cfg)
    calls, in_schedule, plans = [], [False], []
    runner = engine.runner

    def spy(name, fn):
        def wrapped(*a, **k):
            assert not in_schedule[0], f"runner.{name} called inside policy.schedule"
            calls.append(name)
            return fn(*a, **k)

        return wrapped

    for name in ("run", "read_pages", "write_pages"):
        setattr(runner, name, spy(name, getattr(runner, name)))
    schedule = engine.policy.schedule

    def traced_schedule(sched, now):
        in_schedule[0] = True
        try:
            plan = schedule(sched, now)
        finally:
            in_schedule[0] = False
        plans.append((len(plan.swap_out), len(plan.swap_in), len(plan.copies)))
        return plan

    engine.policy.schedule = traced_schedule
    outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_NEW))
    assert [o.outputs[0] for o in outs] == expected
    assert sum(o for o, _, _ in plans) > 0 and sum(i for _, i, _ in plans) > 0
    assert "read_pages" in calls and "write_pages" in calls
    engine.pool.check()
    assert engine.pool.num_in_use == 0 and len(engine.store) == 0


def test_a_swap_out_and_a_swap_in_in_one_step_move_the_right_contents(model):
    """Request a is swapped out and b swapped in by the same plan; b's fresh pages reuse a's.
    The engine reads a's pages before it writes b's, so both contents survive."""
    cfg = ServeConfig(page_size=4, num_pages=4, max_seqs=4, token_budget=32, preemption="swap")
    engine = Engine(model, cfg, warmup=False)
    sched, runner = engine.sched, engine.runner
    a = Request("a", list(range(1, 13)), SamplingParams(), 0.0)  # every page of the pool
    b = Request("b", [7, 8, 9], SamplingParams(), 0.0)
    sched.waiting.extend([a, b])
    (sa,) = sched.admit(a, 0.0)
    sched.reserve(sa, 12, StepPlan())
    sa.num_computed = 12
    shape = runner.read_pages(sa.pages)[0].shape
    a_kv = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    runner.write_pages(sa.pages, a_kv, -a_kv)
    (sb,) = sched.admit(b, 0.0)
    sb.num_computed = 3
    sched.running.remove(b)
    sched.swapped.append(b)
    b_kv = np.full((shape[0], 1, *shape[2:]), 3.0, np.float32)
    engine.store.expect(sb.id, 1)
    engine.store.fill(sb.id, b_kv, -b_kv)
    plan = StepPlan()
    sched.preempt(a, plan, "swap")
    assert sched.swap_in(b, plan)
    assert set(sb.pages) <= set(plan.swap_out[0].pages)  # b reuses a page a just gave up
    engine._move_kv(plan)
    k, v = engine.store.take(sa.id)
    np.testing.assert_array_equal(k, a_kv)
    np.testing.assert_array_equal(v, -a_kv)
    k, v = runner.read_pages(sb.pages)
    np.testing.assert_array_equal(k, b_kv)


# -- one budget, one shape function, the runner protocol -------------------------------------


def test_real_and_simulated_runners_share_shape_for(model):
    cfg = ServeConfig(**BIG, decode_widths=(1, 2), slice_len=3)
    engine = Engine(model, cfg)
    clock = SimClock()
    sim = SimRunner(model.cfg, cfg, clock)
    assert isinstance(engine.runner, StepRunner) and isinstance(sim, StepRunner)
    reqs = [Request(f"x{i}", list(range(1, 4 + 3 * i)), SamplingParams(), 0.0) for i in range(3)]
    for r in reqs:
        engine.sched.waiting.append(r)
        engine.sched.admit(r, 0.0)
    a, b, c = (r.seqs[0] for r in reqs)
    c.num_computed = len(c.tokens) - 1  # c decodes
    c.draft = [5]
    plans = [
        StepPlan(work=[(a, 3), (b, 6)]),
        StepPlan(work=[(a, 3), (c, 2)]),
        StepPlan(work=[(c, 2)]),
        StepPlan(work=[(c, 1)], as_slice=True),
    ]
    for plan in plans:
        for s, n in plan.work:
            engine.sched.reserve(s, n, plan)
        want = shape_for(plan, cfg)
        assert want in all_shapes(cfg)
        assert engine.runner.run(plan).shape == sim.run(plan).shape == want.dims
    assert [shape_for(p, cfg).kind for p in plans] == ["mixed", "mixed", "mixed", "decode"]
    assert shape_for(plans[2], cfg) == Shape("mixed", 8, 2, 0)


def test_policy_budget_is_derived_once():
    cfg = ServeConfig(token_budget=256, policy="sarathi", policy_args={"token_budget": 64})
    assert policies.make_policy("sarathi", cfg).budget == 64
    assert policies.make_policy("fcfs", dataclasses.replace(cfg, policy_args={})).budget == 256


def test_serve_config_derived_fields_survive_replace():
    cfg = ServeConfig(max_seqs=16, token_budget=128)
    assert cfg.decode_sizes == (16,) and cfg.chunk_tokens == 128
    bigger = dataclasses.replace(cfg, max_seqs=64, token_budget=512)
    assert bigger.decode_sizes == (16, 32, 64) and bigger.mixed_decode_sizes == (16, 64)
    assert bigger.prefill_sizes == (32, 128, 512) and bigger.chunk_tokens == 512


def _plan_of(decodes: int, prefill: int = 0) -> StepPlan:
    """A plan of `decodes` one-token decodes and one `prefill`-token chunk (no pages needed)."""
    plan = StepPlan()
    for i in range(decodes):
        seq = Request(f"d{i}", [1, 2, 3], SamplingParams(), 0.0).seqs[0]
        seq.num_computed = 2
        plan.add(seq, 1)
    if prefill:
        plan.add(Request("p", list(range(1, prefill + 5)), SamplingParams(), 0.0).seqs[0], prefill)
    return plan


def test_mixed_steps_take_their_own_decode_buckets():
    cfg = ServeConfig(max_seqs=64, token_budget=512)
    assert shape_for(_plan_of(decodes=20), cfg) == Shape("decode", 32)
    assert shape_for(_plan_of(decodes=20, prefill=10), cfg) == Shape("mixed", 64, 1, 32)
    shapes = all_shapes(cfg)
    assert {s.D for s in shapes if s.kind == "decode"} == {16, 32, 64}
    assert {s.D for s in shapes if s.kind == "mixed"} == {0, 16, 64}
    declared = dataclasses.replace(cfg, decode_buckets=(8, 64))
    assert declared.mixed_decode_sizes == (8, 64)  # declared buckets serve both kinds
    both = dataclasses.replace(declared, mixed_decode_buckets=(64,))
    assert both.decode_sizes == (8, 64) and both.mixed_decode_sizes == (64,)
    with pytest.raises(ConfigError, match="mixed_decode_buckets must end at max_seqs"):
        ServeConfig(max_seqs=64, mixed_decode_buckets=(16,))


def test_a_new_policy_is_one_registered_class(model, prompts, expected):
    @register
    class Newest(FCFS):
        """Admit the newest waiting request first."""

        name = "newest_test"

        def schedule(self, sched, now):
            plan = StepPlan()
            budget = self.serve_running(sched, plan, list(sched.running))
            order = sorted(sched.waiting, key=lambda r: -r.order)
            self.admit_in_order(sched, plan, order, budget, now)
            return self.finish_plan(sched, plan)

    try:
        assert "newest_test" in policies.names()
        engine = Engine(model, ServeConfig(**BIG, policy="newest_test"))
        outs = engine.generate(prompts, SamplingParams(max_tokens=4))
        assert [o.outputs[0] for o in outs] == [e[:4] for e in expected]
        with pytest.raises(ValueError, match="two policies"):
            register(type("Other", (FCFS,), {"name": "newest_test"}))
    finally:
        policies.REGISTRY.pop("newest_test")


# -- per-object state ----------------------------------------------------------------------


def test_two_engines_count_their_own_compilations(model, prompts):
    a = Engine(model, ServeConfig(**BIG))
    warm_a = a.runner.compiles
    assert warm_a > 0
    b = Engine(model, ServeConfig(**BIG, slice_len=2))  # its own jitted steps: compiles in b
    assert b.runner.compiles > 0 and a.runner.compiles == warm_a
    a.generate(prompts[:2], SamplingParams(max_tokens=3))
    assert a.runner.compiles_since_warmup == 0


def test_host_kv_is_keyed_by_sequence_id(model, prompts):
    cfg = ServeConfig(**{**BIG, "num_pages": 14}, preemption="swap")
    engine = Engine(model, cfg)
    seen = set()
    fill = engine.store.fill
    engine.store.fill = lambda sid, k, v: seen.add(sid) or fill(sid, k, v)
    short = [prompts[i] for i in (0, 2, 4)]
    engine.generate(short, SamplingParams(max_tokens=MAX_NEW, n=2))
    assert seen and all(isinstance(s, str) and "/" in s for s in seen)  # "<request>/<index>"
    assert len(engine.store) == 0


def test_logprobs_are_returned_only_when_asked(model, prompts):
    engine = Engine(model, ServeConfig(**BIG, slice_len=2))
    outs = engine.generate(
        prompts[:2],
        [SamplingParams(max_tokens=5, logprobs=True), SamplingParams(max_tokens=5)],
    )
    got = outs[0].request.seqs[0]
    assert len(got.logprobs) == 5 and outs[1].request.seqs[0].logprobs == []
    x = np.asarray(prompts[0] + got.output[:-1])[None]
    logits = np.asarray(model(x), np.float64)[0, len(prompts[0]) - 1 :]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    want = [logits[i, t] - logz[i] for i, t in enumerate(got.output)]
    np.testing.assert_allclose(got.logprobs, want, atol=1e-4)
    none_returned, run = [], engine.runner.run

    def spy(plan):
        result = run(plan)
        none_returned.append(result.logprobs is None)
        return result

    engine.runner.run = spy
    engine.generate(prompts[:1], SamplingParams(max_tokens=2))
    assert none_returned and all(none_returned)
