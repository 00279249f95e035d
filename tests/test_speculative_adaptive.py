"""AdaSpec: confidences, the goodput model's choices, step costs learnt from the engine, and
an adaptive engine whose output equals the non-speculative one."""

import types

import numpy as np
import pytest
from flax import nnx

from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.engine import Engine
from mlx_sched.serve.request import SamplingParams
from mlx_sched.speculative.adaptive import BETA, START, AdaSpec, StepCosts
from models import ModelConfig, Transformer


def costs(decode=10e-3, per_draft=0.1, draft_per_tok=0.0):
    """A cost table: a decode iteration of D slots costs decode * D / 8; a verify step of
    width L costs that times (1 + per_draft * (L - 1)); a proposal of k drafts for a bucket of
    D slots costs draft_per_tok * k * D / 8."""
    c = StepCosts(decode_sizes=(8, 64), verify_sizes=(8, 64), draft_sizes=(8, 64))
    for D in (8, 64):
        c.decode[D] = decode * D / 8
        for L in (2, 3, 5):
            c.verify[D, L] = decode * D / 8 * (1 + per_draft * (L - 1))
            c.draft[D, L - 1] = draft_per_tok * (L - 1) * D / 8
    return c


def test_confidence_is_a_running_mean_of_acceptance_from_0_6():
    ada = AdaSpec((1, 2, 3, 5), 4, costs(), slice_len=1)
    assert ada.confidence["a"] == START == 0.6
    ada.observe("a", 4, 4)  # four accepted
    assert ada.confidence["a"] == pytest.approx(1 - (1 - START) * (1 - BETA) ** 4)
    ada.observe("b", 4, 0)  # the first draft rejected
    assert ada.confidence["b"] == pytest.approx(START * (1 - BETA))
    ada.forget("a")
    assert ada.confidence["a"] == START


def test_goodput_follows_the_formula():
    c = costs()
    ada = AdaSpec((1, 2, 3, 5), 4, c, slice_len=1)
    conf = [0.9, 0.5, 0.2]
    want = (3 + 0.9 + 0.81 + 0.5 + 0.25) / (c.verify_time(3, 3) + c.draft_time(2, 2))
    assert ada.goodput(conf, 2, 2) == pytest.approx(want)
    assert ada.goodput(conf, 0, 0) == pytest.approx(3 / c.decode_time(3, 1))


def test_speculates_when_verification_is_cheap_and_stops_when_it_is_not():
    ids = [f"s{i}" for i in range(8)]
    cheap = AdaSpec((1, 2, 3, 5), 4, costs(per_draft=0.1), slice_len=1)
    for i in ids:
        cheap.observe(i, 4, 4)  # confident
    assert set(cheap.choose(ids).values()) == {4}  # the widest compiled width, everyone
    dear = AdaSpec((1, 2, 3, 5), 4, costs(per_draft=1.5), slice_len=1)
    for i in ids:
        dear.observe(i, 4, 4)
    assert set(dear.choose(ids).values()) == {0}  # compute-bound verification: no speculation
    # low confidence: speculation does not pay even when verification is cheap
    doubtful = AdaSpec((1, 2, 3, 5), 4, costs(per_draft=0.1), slice_len=1)
    for i in ids:
        for _ in range(10):
            doubtful.observe(i, 4, 0)
    assert set(doubtful.choose(ids).values()) == {0}


def test_only_the_confident_sequences_draft_when_drafting_costs():
    """A draft model whose proposal cost grows with its slot bucket: the confident
    sequences fill the small bucket, the rest do not draft."""
    c = costs(per_draft=0.1, draft_per_tok=4e-3)
    ada = AdaSpec((1, 2, 3, 5), 4, c, slice_len=1)
    ids = [f"s{i}" for i in range(16)]
    for n, i in enumerate(ids):
        for _ in range(10):
            ada.observe(i, 4, 4 if n < 8 else 0)
    got = ada.choose(ids)
    assert {got[i] for i in ids[8:]} == {0}
    assert {got[i] for i in ids[:8]} != {0}


def test_step_costs_learn_from_step_records():
    c = StepCosts(decode_sizes=(8,), verify_sizes=(8,), window=3)
    c.decode[8] = 0.5  # profiled: stands until the first measurement
    rec = types.SimpleNamespace(kind="decode", shape=(8, 4), iters=4, device_s=0.04, host_s=0.002)
    c.observe_step(rec)
    assert c.decode[8] == pytest.approx(0.01) and c.host["decode"] == pytest.approx(0.002)
    c.observe_step(types.SimpleNamespace(kind="decode", shape=(8, 4), iters=2, device_s=0.04,
                                         host_s=0.002))  # fmt: skip
    assert c.decode[8] == pytest.approx(0.015)  # the median of 0.01 and 0.02
    # a slow outlier moves the median of the window, not the estimate to it
    for seconds in (0.4, 0.012, 0.011):
        c.observe_step(types.SimpleNamespace(kind="decode", shape=(8, 4), iters=4,
                                             device_s=4 * seconds, host_s=0.002))  # fmt: skip
    assert c.decode[8] == pytest.approx(0.012)  # the window holds 0.4, 0.012, 0.011
    mixed = types.SimpleNamespace(kind="mixed", shape=(8, 3, 0), iters=1, device_s=0.03, host_s=0)
    c.observe_step(mixed)
    assert c.verify[8, 3] == pytest.approx(0.03)
    c.observe_step(types.SimpleNamespace(kind="mixed", shape=(8, 3, 64), iters=1, device_s=1.0,
                                         host_s=0))  # fmt: skip
    assert c.verify[8, 3] == pytest.approx(0.03)  # steps with prefill rows are not verify costs
    assert c.verify_time(8, 5) > 0  # an unmeasured width: the nearest entry stands in


# -- the engine ---------------------------------------------------------------------------


def tiny(seed, d=32, layers=2):
    cfg = ModelConfig(vocab_size=264, d_model=d, n_layers=layers, n_heads=4, n_kv_heads=2,
                      d_ff=2 * d, max_seq_len=96, init_std=0.3)  # fmt: skip
    return Transformer(cfg, nnx.Rngs(seed))


@pytest.mark.parametrize("kind", ["prompt_lookup", "draft_model"])
def test_adaptive_engine_output_equals_non_speculative(kind):
    target = tiny(3)
    rng = np.random.default_rng(2)
    prompts = [list(map(int, rng.integers(0, 256, n))) for n in (5, 17, 9, 30)]
    prompts[1] = prompts[1][:6] * 4
    base = dict(page_size=4, num_pages=256, max_seqs=8, decode_buckets=(2, 8), token_budget=64,
                prefill_buckets=(64,), max_prefill_rows=2)  # fmt: skip
    sp = SamplingParams(max_tokens=20)
    ref = [o.outputs[0] for o in Engine(target, ServeConfig(**base)).generate(prompts, sp)]
    spec = {"kind": kind, "gamma": 4, "adaptive": True}
    cfg = ServeConfig(**base, decode_widths=(1, 2, 3, 5), speculative=spec)
    draft = tiny(3) if kind == "draft_model" else None  # identical: always accepted
    engine = Engine(target, cfg, draft_model=draft)
    ada = engine.spec.adaptive
    assert ada.costs.decode and ada.costs.verify  # profiled at warm-up
    if kind == "draft_model":  # a call's fixed cost plus k + 1 iterations
        per_k = [ada.costs.draft[2, k] for k in range(1, 5)]
        assert per_k[0] > 0 and per_k == sorted(per_k)
    assert [o.outputs[0] for o in engine.generate(prompts, sp)] == ref
    assert engine.runner.compiles_since_warmup == 0 and engine.pool.num_in_use == 0
    assert not ada.confidence  # finished requests are forgotten, by the drafter too
    assert not getattr(engine.spec.drafter, "computed", {})
    # per-request counts include each request's last step
    m = engine.request_metrics()
    recs = engine.step_records
    assert sum(r.get("spec_proposed", 0) for r in m) == sum(r.spec_proposed for r in recs)
    assert sum(r.get("spec_accepted", 0) for r in m) == sum(r.spec_accepted for r in recs)


@pytest.mark.parametrize("verification", ["cheap", "dear"])
def test_the_engine_follows_the_controllers_choice(verification):
    """Frozen cost tables (learn = False), a draft that is always right: where verification
    is cheap every decoding step speculates; where it costs more than the tokens it can add,
    none does."""
    target = tiny(3)
    base = dict(page_size=4, num_pages=256, max_seqs=8, decode_buckets=(8,), token_budget=64,
                prefill_buckets=(64,), max_prefill_rows=2)  # fmt: skip
    spec = {"kind": "draft_model", "gamma": 2, "adaptive": True}
    cfg = ServeConfig(**base, decode_widths=(1, 3), speculative=spec)
    engine = Engine(target, cfg, draft_model=target)  # its drafts are always accepted
    c = engine.spec.adaptive.costs
    c.learn = False
    c.host.update(decode=0.0, mixed=0.0)
    c.draft = {key: 0.0 for key in c.draft}
    c.decode[8] = 1e-3
    c.verify[8, 3] = 1.1e-3 if verification == "cheap" else 1e-2
    prompts = [[7, 8, 9] * 6, [1, 2, 3, 4] * 5]
    engine.generate(prompts, SamplingParams(max_tokens=12))
    decoding = [r for r in engine.step_records if r.num_decode and not r.num_prefill_tokens]
    verified = [r for r in decoding if r.spec_proposed]
    if verification == "cheap":
        assert len(verified) >= len(decoding) - 1  # the last step may have no room for drafts
    else:
        assert not verified


def test_warmup_warns_when_the_shapes_are_many(monkeypatch, caplog):
    """Many compiled programs exhausted LLVM's memory mappings in one process (a segfault
    with AdaSpec's five widths x every power-of-two bucket): warm-up says so beforehand."""
    import logging

    from mlx_sched.serve import runner

    monkeypatch.setattr(runner, "MANY_SHAPES", 1)
    cfg = ServeConfig(page_size=4, num_pages=64, max_seqs=2, token_budget=16, max_prefill_rows=1)
    with caplog.at_level(logging.WARNING):
        Engine(tiny(1, d=16, layers=1), cfg)
    assert any("coarser mixed_decode_buckets" in r.message for r in caplog.records)


def test_choose_maximises_the_goodput_formula():
    """The per-step choice (vectorised) is the (k, m) of largest `goodput` among the
    candidates, on random confidences and costs."""
    rng = np.random.default_rng(0)
    for trial in range(20):
        c = costs(
            per_draft=float(rng.uniform(0.02, 0.5)), draft_per_tok=float(rng.uniform(0, 3e-3))
        )
        ada = AdaSpec((1, 2, 3, 5, 9), 8, c, slice_len=1)
        ids = [f"s{i}" for i in range(int(rng.integers(1, 20)))]
        for i in ids:
            ada.confidence[i] = float(rng.uniform(0, 1))
        got = ada.choose(ids)
        conf = [ada.confidence[i] for i in ids]
        ms = sorted({min(s, len(ids)) for s in c.draft_sizes} | {len(ids)})
        cands = [(0, 0)] + [(k, m) for k in (1, 2, 4, 8) for m in ms]
        best = max(cands, key=lambda km: (ada.goodput(conf, *km), -km[0]))
        assert ada.last == best or ada.goodput(conf, *ada.last) == pytest.approx(
            ada.goodput(conf, *best)
        ), trial
        assert sorted(got.values()).count(ada.last[0]) >= (ada.last[1] if ada.last[0] else 0)


def test_a_proposals_cost_leaves_out_catching_up_on_a_new_prompt(monkeypatch):
    from mlx_sched.serve.plan import StepPlan
    from mlx_sched.serve.request import Request, Seq
    from mlx_sched.speculative import speculator as spec_mod
    from mlx_sched.speculative.drafters import Drafter
    from mlx_sched.speculative.speculator import Speculator

    clock = [0.0]
    monkeypatch.setattr(spec_mod.time, "perf_counter", lambda: clock[0])

    class Slow(Drafter):  # 4 s catching up on the prompt, then 1 s proposing
        def propose(self, seqs, ks):
            clock[0] += 5.0
            self.catch_up_s = 4.0
            return [[7] * k for k in ks]

    spec = {"kind": "prompt_lookup", "gamma": 2, "adaptive": True}
    cfg = ServeConfig(max_seqs=8, decode_buckets=(8,), decode_widths=(1, 3), speculative=spec)
    sp = Speculator(cfg, Slow())
    req = Request("r", [1, 2, 3], SamplingParams(max_tokens=8), 0.0)
    seq = Seq(req, 0, [1, 2, 3], num_computed=2)
    req.seqs = [seq]
    plan = StepPlan()
    plan.add(seq, 3)  # the last token and two drafts
    stats = sp.fill(plan, [req])
    assert stats.draft_s == 5.0  # the step's drafting time holds both
    assert sp.adaptive.costs.draft == {(0, 2): 1.0}  # the proposal's cost: 1 s
