"""Reliability: parallel sampling under preemption, swap during copy-on-write, the
state x event table, and an engine whose memory does not grow with the requests it served."""

import jax
import numpy as np
import pytest
from flax import nnx

from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.engine import Engine
from mlx_sched.serve.plan import StepPlan
from mlx_sched.serve.policies.fcfs import FCFS
from mlx_sched.serve.request import SamplingParams, Status
from models import ModelConfig, Transformer
from models import generate as reference

MAX_NEW = 10


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
        init_std=0.3,  # varied greedy continuations
    )
    return Transformer(cfg, nnx.Rngs(5))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(2)
    return [list(map(int, rng.integers(0, 256, n))) for n in (6, 13, 21, 9, 3, 17)]


@pytest.fixture(scope="module")
def expected(model, prompts):
    return reference.generate(model, prompts, MAX_NEW)


def small(**kw):
    base = dict(
        page_size=4,
        num_pages=64,
        max_seqs=8,
        decode_buckets=(8,),
        token_budget=32,
        prefill_buckets=(32,),
        max_prefill_rows=2,
    )
    return ServeConfig(**{**base, **kw})


def run_all(engine, limit=3000):
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        assert steps < limit, "no progress: a livelock"


def clean(engine):
    engine.pool.check()
    assert engine.pool.num_in_use == 0, "pages leaked"
    assert len(engine.store) == 0, "host KV left behind"
    assert not engine.sched.has_work()
    assert all(r.is_finished for r in engine.requests.values())
    assert not engine._stops and not engine._callbacks


# -- the four bugs of the issue -----------------------------------------------------------------


def test_a_finished_sample_is_not_prefilled_again_after_recompute(model, prompts, expected):
    engine = Engine(model, small())
    rid = engine.add_request(prompts[2], SamplingParams(max_tokens=MAX_NEW, n=3))
    req = engine.requests[rid]
    while len(req.seqs) < 3 or req.seqs[0].num_generated < 3:
        engine.step()
    done = req.seqs[1]  # finishes now, as a stop token would end it
    done.done, done.finish_reason = True, "stop"
    engine.sched.free_seq(done)
    kept = list(done.tokens)
    engine.sched.preempt(req, StepPlan(), "recompute")
    run_all(engine)
    assert done.tokens == kept and done.pages == [] and done.num_computed < len(kept)
    for s in (req.seqs[0], req.seqs[2]):
        assert s.output == expected[2]  # greedy: every live sample equals the reference
    clean(engine)


def test_admission_reserves_slots_for_every_sample(model):
    """The issue's reproduction: a prefilling n=8 request held one slot, then forked to 8."""
    engine = Engine(model, small(num_pages=512, max_seqs=8, token_budget=32))
    engine.add_request(list(range(1, 61)), SamplingParams(max_tokens=8, n=8, temperature=1.0))
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=8))
    with jax.no_tracing():
        run_all(engine)
    assert max(s.num_decode for s in engine.step_records) <= 8
    clean(engine)


@pytest.mark.parametrize("max_copies", [1, 2])
def test_more_samples_than_copies_per_step_still_progress(model, prompts, expected, max_copies):
    """n >= max_copies + 2 used to be preempted every step forever; copies now spread over
    several steps."""
    engine = Engine(model, small(max_copies=max_copies))
    (out,) = engine.generate([prompts[0]], SamplingParams(max_tokens=MAX_NEW, n=max_copies + 3))
    assert all(o == expected[0] for o in out.outputs)
    assert out.request.preemptions == 0
    clean(engine)


class SwapAfterCopy(FCFS):
    """FCFS that, the first time a plan copies a page, swaps that page's request out in the
    same plan: the copy has not happened yet when the swap-out is planned."""

    name = "swap_after_copy_test"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.fired = False

    def schedule(self, sched, now):
        plan = super().schedule(sched, now)
        if plan.copies and not self.fired:
            dst = plan.copies[0][1]
            owner = next(r for r in sched.running for s in r.seqs if dst in s.pages)
            sched.preempt(owner, plan, "swap")
            self.fired = True
        return plan


def test_swap_while_a_copy_on_write_is_pending_keeps_the_kv(model, prompts, expected):
    engine = Engine(model, small(preemption="swap", slice_len=2))
    policy = SwapAfterCopy(engine.cfg)
    policy.bind(engine.sched)
    engine.policy = policy
    outs = engine.generate(prompts[:3], SamplingParams(max_tokens=MAX_NEW, n=2))
    assert policy.fired
    for i, o in enumerate(outs):
        assert o.outputs == [expected[i]] * 2, i  # no sample read zeroed prompt positions
    clean(engine)


def test_aborts_from_inside_output_callbacks(model, prompts, expected):
    """A callback may abort its own request, or another one, in the middle of a step."""
    engine = Engine(model, small(slice_len=2))
    ids = {}

    def abort_self(out):
        if sum(map(len, out.outputs)) >= 3 and not out.finished:
            engine.abort(out.request_id)

    def abort_other(out):
        victim = engine.requests.get(ids.get("victim"))
        if victim is not None and not victim.is_finished:
            engine.abort(victim.id)

    ids["self"] = engine.add_request(prompts[1], SamplingParams(max_tokens=9), on_output=abort_self)
    ids["victim"] = engine.add_request(prompts[3], SamplingParams(max_tokens=9, n=2))
    ids["other"] = engine.add_request(
        prompts[0], SamplingParams(max_tokens=MAX_NEW), on_output=abort_other
    )
    run_all(engine)
    me, victim, other = (engine.requests[ids[k]] for k in ("self", "victim", "other"))
    assert me.status is Status.ABORTED and 3 <= len(me.outputs()[0]) < 9
    assert victim.status is Status.ABORTED
    assert other.status is Status.FINISHED and other.outputs()[0] == expected[0]
    clean(engine)


def test_a_sample_request_that_cannot_fork_for_lack_of_pages_waits(model, prompts):
    """Found by the soak: a one-token n=2 prompt forked at admission with no page free, was
    swapped out by its own admission, and the priority policy then admitted it again from the
    swapped list (ValueError). It now waits, and the lower-priority request gives way."""
    cfg = small(num_pages=5, preemption="swap", policy="priority", policy_args={"preempt": True})
    engine = Engine(model, cfg)
    low = engine.add_request(list(range(1, 11)), SamplingParams(max_tokens=6), priority=0)
    while engine.requests[low].seqs[0].num_generated < 4:
        engine.step()
    assert engine.pool.num_available == 0
    high = engine.add_request([173], SamplingParams(max_tokens=1, n=2), priority=1)
    run_all(engine)
    ref = reference.generate(model, [list(range(1, 11)), [173]], 6)
    assert engine.requests[low].outputs()[0] == ref[0]
    assert engine.requests[high].outputs() == [ref[1][:1]] * 2
    assert engine.requests[low].preemptions > 0
    clean(engine)


# -- every state x every event -----------------------------------------------------------------

STATES = ("waiting", "prefilling", "decoding", "sample_finished", "swapped")
EVENTS = ("preempt_recompute", "preempt_swap", "fork", "abort", "finish", "page_exhaustion")

# what each (state, event) pair means; None: the event cannot happen in that state
APPLIES = {
    ("waiting", "preempt_recompute"): None,  # not on the device
    ("waiting", "preempt_swap"): None,
    ("waiting", "fork"): None,  # forks happen when the prompt is done
    ("swapped", "preempt_recompute"): None,  # already off the device
    ("swapped", "preempt_swap"): None,
    ("swapped", "fork"): None,
    ("decoding", "fork"): None,  # already forked
    ("sample_finished", "fork"): None,
    ("waiting", "finish"): None,
    ("prefilling", "finish"): None,
    ("swapped", "finish"): None,
}


def _to_state(engine, rid, state):
    req = engine.requests[rid]
    if state == "waiting":
        return
    if state == "prefilling":
        while req.seqs[0].num_computed == 0:
            engine.step()
        assert req.seqs[0].remaining > 1 and req.status is Status.RUNNING
        return
    while len(req.seqs) < 2 or req.seqs[0].num_generated < 2:
        engine.step()
    if state == "sample_finished":  # as a stop token ends one sample
        s = req.seqs[1]
        s.done, s.finish_reason = True, "stop"
        engine.sched.free_seq(s)
    elif state == "swapped":
        plan = StepPlan()
        engine.sched.preempt(req, plan, "swap")
        engine._move_kv(plan)
        assert req.status is Status.SWAPPED


def _apply(engine, rid, event, prompts):
    req = engine.requests[rid]
    if event in ("preempt_recompute", "preempt_swap"):
        plan = StepPlan()
        engine.sched.preempt(req, plan, event.split("_")[1])
        engine._move_kv(plan)
    elif event == "fork":
        while len(req.seqs) < 2:  # the prefill completes and the request forks
            engine.step()
    elif event == "abort":
        engine.abort(rid)
    elif event == "finish":  # its samples run to their end while the bystander runs
        while not req.is_finished:
            engine.step()
    elif event == "page_exhaustion":  # the pool runs dry until the policy preempts someone
        held = engine.pool.allocate(engine.pool.num_available)
        running = list(engine.sched.running)
        preempted = lambda: sum(r.preemptions for r in running)  # noqa: E731
        start = preempted()
        # (while two requests run, so one can give way and the other keeps the engine busy)
        while (
            preempted() == start
            and len(engine.sched.running) >= 2
            and any(s.remaining == 1 for r in engine.sched.running for s in r.live_seqs)
        ):
            engine.step()
        engine.pool.free(held)


@pytest.fixture(scope="module", params=["recompute", "swap"])
def table_engine(model, request):
    # no prefix cache: each case must prefill the same prompt again from scratch
    cfg = small(num_pages=32, prefill_chunk=8, preemption=request.param, prefix_caching=False)
    return Engine(model, cfg)


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("event", EVENTS)
def test_state_event_table(table_engine, prompts, expected, state, event):
    if (state, event) in APPLIES:
        pytest.skip(f"{event} cannot happen to a {state} request")
    engine = table_engine
    other = engine.add_request(prompts[0], SamplingParams(max_tokens=MAX_NEW))  # a bystander
    rid = engine.add_request(prompts[2], SamplingParams(max_tokens=MAX_NEW, n=2))
    _to_state(engine, rid, state)
    _apply(engine, rid, event, prompts)
    run_all(engine)
    req, bystander = engine.requests[rid], engine.requests[other]
    assert bystander.outputs()[0] == expected[0]
    if event == "abort":
        assert req.status is Status.ABORTED
    for s in req.seqs:
        assert s.output == expected[2][: len(s.output)]  # never a wrong token
        assert len(s.output) <= MAX_NEW  # never a token past max_tokens
        if req.status is Status.FINISHED and s.finish_reason == "length":
            assert len(s.output) == MAX_NEW
    if event == "page_exhaustion" and state in ("decoding", "sample_finished"):
        assert req.preemptions > 0  # the newest running request gave way
    clean(engine)


# -- memory ------------------------------------------------------------------------------------


def test_finished_requests_leave_the_engine(model, prompts):
    engine = Engine(model, small(history=3))
    for i in range(10):
        engine.generate([prompts[i % 6]], SamplingParams(max_tokens=2))
    rid = engine.add_request([1, 2, 3], SamplingParams(max_tokens=50))
    engine.step()
    engine.abort(rid)
    assert len(engine.requests) == 3  # the history only
    assert len(engine.step_records) <= 3 and len(engine.request_metrics()) == 3
    assert engine.totals.finished == 10 and engine.totals.aborted == 1
    assert engine.totals.output_tokens == 20 + len(engine.requests[rid].seqs[0].output)
    assert engine.totals.ttft.n == 11  # every request that got a first token, aborted too
    assert not engine._stops and not engine._callbacks
    clean(engine)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_short_soak(mode):
    """The soak (experiments/soak.py) in small: 400 requests, every feature on, checked."""
    import dataclasses

    from mlx_sched.lab import soak

    model = Transformer(soak.soak_model_config(), nnx.Rngs(0))
    cfg = small(num_pages=64, max_seqs=16, decode_buckets=(), slice_len=4, max_copies=2)
    requests = soak.make_requests(400, 264, seed=3)
    reference = soak.reference_outputs(model, cfg, requests)
    for policy, args in (("fcfs", {}), ("priority", {"preempt": True}), ("mlfq", {})):
        run = dataclasses.replace(cfg, preemption=mode, policy=policy, policy_args=args)
        res = soak.soak(model, run, requests, reference)
        assert soak.check(res) == [], policy
        assert res.preemptions > 0 and res.aborted_in_callback > 0
