"""Speculative decoding: drafters, the speculator's plan edits, and outputs token for token
equal to the non-speculative engine's (greedy and sampled) with every feature that touches a
decoding sequence."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.engine import Engine
from mlx_sched.serve.request import SamplingParams
from mlx_sched.speculative.drafters import lookup
from models import ModelConfig, Transformer
from models.errors import ConfigError

BASE = dict(
    page_size=4,
    num_pages=256,
    max_seqs=8,
    decode_buckets=(8,),
    token_budget=64,
    prefill_buckets=(64,),
    max_prefill_rows=2,
)
SPEC = dict(**BASE, decode_widths=(1, 5))
MAX_NEW = 16


def tiny(seed, d=32, layers=2, **kw):
    cfg = ModelConfig(vocab_size=264, d_model=d, n_layers=layers, n_heads=4, n_kv_heads=2,
                      d_ff=2 * d, max_seq_len=96, init_std=0.3, **kw)  # fmt: skip
    return Transformer(cfg, nnx.Rngs(seed))


@pytest.fixture(scope="module")
def target():
    return tiny(3)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    out = [list(map(int, rng.integers(0, 256, n))) for n in (5, 17, 9, 30, 3, 12)]
    out[5] = out[3][:16] + out[5]  # a shared prefix: prefix-cache hits
    out[2] = out[2] + out[2] + out[2][:4]  # repeats: prompt lookup finds matches
    return out


@pytest.fixture(scope="module")
def plain(target, prompts):
    engine = Engine(target, ServeConfig(**BASE))
    return [r.outputs[0] for r in engine.generate(prompts, SamplingParams(max_tokens=MAX_NEW))]


def test_lookup_takes_the_latest_longest_match():
    toks = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert lookup(toks, 2, 3, 1) == [7, 8]  # "2 3" last seen before 7 8 (latest match)
    assert lookup([1, 2, 3, 4, 5], 3, 3, 1) == []  # no earlier occurrence
    assert lookup([4, 4, 4], 5, 2, 1) == [4] * 5  # overlapping match: the repeat goes on
    assert lookup([5, 6, 7, 5, 6], 4, 2, 2) == [7, 5, 6, 7]  # period 3, past the end
    assert lookup([1, 9, 1, 9, 1], 3, 1, 1) == [9, 1, 9]
    assert lookup([5], 3, 3, 1) == []


def _run(engine, prompts, sampling):
    outs = engine.generate(prompts, sampling)
    return [o.outputs[0] for o in outs]


@pytest.mark.parametrize("kind", ["prompt_lookup", "draft_model"])
def test_greedy_output_equals_non_speculative(target, prompts, plain, kind):
    draft = tiny(5, d=16, layers=1) if kind == "draft_model" else None
    cfg = ServeConfig(**SPEC, speculative={"kind": kind, "gamma": 4})
    engine = Engine(target, cfg, draft_model=draft)
    got = _run(engine, prompts, SamplingParams(max_tokens=MAX_NEW))
    assert got == plain
    recs = engine.step_records
    assert sum(r.spec_proposed for r in recs) > 0
    assert engine.runner.compiles_since_warmup == 0
    if draft is not None:
        assert engine.spec.drafter.runner.compiles_since_warmup == 0
    assert engine.pool.num_in_use == 0
    engine.pool.check()


def test_a_draft_identical_to_the_target_is_always_accepted(target, prompts, plain):
    cfg = ServeConfig(**SPEC, speculative={"kind": "draft_model", "gamma": 4})
    engine = Engine(target, cfg, draft_model=target)
    runner, caught_up = engine.spec.drafter.runner, []
    run = runner.run

    def counting(plan, *args, **kwargs):
        if not plan.as_slice:
            caught_up.extend(n for _, n in plan.work)
        return run(plan, *args, **kwargs)

    runner.run = counting
    assert _run(engine, prompts, SamplingParams(max_tokens=MAX_NEW)) == plain
    # each proposal also wrote its last draft's K/V, so keeping every draft needed no catch-up:
    # the draft computed each prompt once, and then only in its proposals
    assert sum(caught_up) == sum(map(len, prompts))
    recs = engine.step_records
    proposed = sum(r.spec_proposed for r in recs)
    assert proposed > 0 and sum(r.spec_accepted for r in recs) == proposed
    m = engine.request_metrics()
    assert all(r["spec_acceptance"] == 1.0 for r in m if "spec_proposed" in r)
    # several tokens per verify: fewer decode steps than tokens
    assert sum(r.new_tokens for r in recs) > len([r for r in recs if r.num_decode])
    spec = engine.summary(1.0)["speculative"]
    assert spec["proposed"] == spec["accepted"] == proposed and spec["acceptance"] == 1.0
    assert spec["tokens_per_verify"] > 2 and spec["draft_s"] > 0 and spec["verify_s"] > 0
    assert "speculative" not in Engine(target, ServeConfig(**BASE)).summary(1.0)


def _draft(kind):
    return tiny(5, d=16, layers=1) if kind == "draft_model" else None


@pytest.mark.parametrize("kind", ["prompt_lookup", "draft_model", "draft_tree"])
@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_equal_under_preemption_chunked_prefill_and_parallel_sampling(target, kind, preemption):
    """Few pages (speculating sequences preempted and resumed), a prompt longer than the
    token budget (chunked prefill), n = 3 (forks: copy-on-write), a stop token: the outputs of
    every sequence equal the non-speculative engine's under the same settings."""
    rng = np.random.default_rng(7)
    prompts = [list(map(int, rng.integers(0, 256, n))) for n in (70, 6, 11, 23)]
    prompts[1] = prompts[1] * 4  # repeats for prompt lookup
    small = dict(BASE, num_pages=40, preemption=preemption)
    sps = [SamplingParams(max_tokens=MAX_NEW, n=3 if i == 2 else 1) for i in range(4)]
    ref_engine = Engine(target, ServeConfig(**small))
    ref = [o.outputs for o in ref_engine.generate(prompts, sps)]
    stop = ref[3][0][5]  # a token of the greedy continuation: stops in a run of drafts
    sps[3] = SamplingParams(max_tokens=MAX_NEW, stop_tokens=(stop,))
    ref[3] = Engine(target, ServeConfig(**small)).generate([prompts[3]], sps[3])[0].outputs
    spec = {"kind": kind, "gamma": 4}
    if kind == "draft_tree":  # a token tree: 2 x 2 nodes, its siblings a perturbed draft's
        spec = {"kind": "draft_model", "gamma": 2, "tree_width": 2}
    cfg = ServeConfig(**small, decode_widths=(1, 5), speculative=spec)
    draft = _perturbed(target, 0.1) if kind == "draft_tree" else _draft(kind)
    engine = Engine(target, cfg, draft_model=draft)
    got = [o.outputs for o in engine.generate(prompts, sps)]
    assert got == ref
    assert ref[3][0][-1] == stop
    assert sum(r.preemptions for r in engine.requests.values()) > 0, "nothing was preempted"
    assert any(r.spec_proposed for r in engine.step_records)
    assert engine.pool.num_in_use == 0 and engine.runner.compiles_since_warmup == 0
    engine.pool.check()


@pytest.mark.parametrize("kind", ["prompt_lookup", "draft_model"])
def test_sampled_output_equals_non_speculative_under_the_match_rule(target, prompts, kind):
    """Sampling with per-request seeds, drafts accepted while they equal the target's own
    sample (the match rule; prompt lookup's only rule): each position's sample does not
    depend on the drafts, so the output is the non-speculative one, token for token."""
    sps = [SamplingParams(max_tokens=MAX_NEW, temperature=0.9, top_k=20, seed=i)
           for i in range(len(prompts))]  # fmt: skip
    ref = _run(Engine(target, ServeConfig(**BASE)), prompts, sps)
    spec = {"kind": kind, "gamma": 3, "acceptance": "match"}
    engine = Engine(target, ServeConfig(**SPEC, speculative=spec), draft_model=_draft(kind))
    assert _run(engine, prompts, sps) == ref


def test_rejection_rule_outputs_are_reproducible_and_accept_more(target, prompts):
    """Leviathan's rule (the default with a draft model): the same seeds give the same output
    again, a request's output does not depend on its batch companions, and a draft close to
    the target is accepted more often than by the match rule."""
    sps = [SamplingParams(max_tokens=MAX_NEW, temperature=0.9, seed=i) for i in range(6)]
    spec = {"kind": "draft_model", "gamma": 3}
    near = _perturbed(target, 0.02)

    def run(acceptance, which=None):
        cfg = ServeConfig(**SPEC, speculative=dict(spec, acceptance=acceptance))
        engine = Engine(target, cfg, draft_model=near)
        ps, ss = (prompts, sps) if which is None else ([prompts[which]], [sps[which]])
        out = _run(engine, ps, ss)
        recs = engine.step_records
        rate = sum(r.spec_accepted for r in recs) / sum(r.spec_proposed for r in recs)
        return out, rate

    first, rate = run("rejection")
    assert run("rejection")[0] == first
    assert run("rejection", which=2)[0] == [first[2]]  # alone: the same tokens
    _, match_rate = run("match")
    assert rate > match_rate


def _perturbed(model, scale):
    """A copy of `model` with every weight moved by `scale` relative noise."""
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    state = jax.tree.map(
        lambda x: x * (1 + scale * rng.standard_normal(x.shape).astype(np.float32)), state
    )
    return nnx.merge(graphdef, state)


@pytest.mark.parametrize("kind,width,gamma", [("prompt_lookup", 3, 2), ("draft_model", 2, 3),
                                              ("draft_model", 3, 2)])  # fmt: skip
def test_token_trees_greedy_output_equals_non_speculative(target, prompts, plain, kind, width,
                                                          gamma):  # fmt: skip
    """SpecInfer's token trees at the verify width of a 6-draft chain: the output is the
    non-speculative one. With a draft close to the target, siblings are taken where its first
    choice is wrong, and their K/V is moved to the path's positions on device (without the move
    the next tokens would differ)."""
    draft = _perturbed(target, 0.1) if kind == "draft_model" else None
    spec = {"kind": kind, "gamma": gamma, "tree_width": width}
    cfg = ServeConfig(**dict(SPEC, decode_widths=(1, 7)), speculative=spec)
    engine = Engine(target, cfg, draft_model=draft)
    assert _run(engine, prompts, SamplingParams(max_tokens=MAX_NEW)) == plain
    recs = engine.step_records
    assert sum(r.spec_proposed for r in recs) > 0
    _each_verify_keeps_its_accepted_drafts_and_one_more(recs)
    if draft is not None:
        assert sum(r.spec_accepted for r in recs) > 0
        assert engine.spec.drafter.runner.compiles_since_warmup == 0
    assert engine.runner.compiles_since_warmup == 0 and engine.pool.num_in_use == 0
    engine.pool.check()


def _each_verify_keeps_its_accepted_drafts_and_one_more(recs):
    """Steps of decodes only: every sequence gets its accepted drafts plus the correction or
    bonus token (drafts never run past max_tokens, and these runs have no stop token)."""
    pure = [r for r in recs if r.kind == "mixed" and r.spec_proposed and not r.num_prefill_tokens]
    assert pure
    for r in pure:
        assert r.new_tokens == r.spec_accepted + r.num_decode


@pytest.mark.parametrize("acceptance", ["rejection", "match"])
def test_chain_verify_keeps_the_correction_token(target, prompts, acceptance):
    """Partial acceptance (a perturbed draft, greedy and sampled requests): the token after
    the accepted drafts is kept in the same step (a regression dropped it)."""
    sps = [SamplingParams(max_tokens=MAX_NEW, temperature=0.8 * (i % 2), seed=i)
           for i in range(len(prompts))]  # fmt: skip
    spec = {"kind": "draft_model", "gamma": 4, "acceptance": acceptance}
    engine = Engine(
        target, ServeConfig(**SPEC, speculative=spec), draft_model=_perturbed(target, 0.1)
    )
    _run(engine, prompts, sps)
    recs = engine.step_records
    assert 0 < sum(r.spec_accepted for r in recs) < sum(r.spec_proposed for r in recs)
    _each_verify_keeps_its_accepted_drafts_and_one_more(recs)


def test_lookup_trees_merge_continuations():
    from mlx_sched.speculative.drafters import continuations, trie

    toks = [1, 2, 7, 8, 5, 1, 2, 9, 4, 6, 1, 2, 7, 3, 1, 2]
    conts = continuations(toks, 2, 3, 2, 2)
    assert conts == [[7, 3], [9, 4], [7, 8]]  # latest match first, distinct
    tokens, parents = trie(conts, budget=10)
    assert tokens == [7, 3, 9, 4, 8] and parents == [-1, 0, 1, 0, 3, 1]  # "7" shared
    assert trie(conts, budget=3) == ([7, 3, 9], [-1, 0, 1, 0])


def test_moe_target_with_a_dense_draft(prompts):
    moe = tiny(3, moe={"num_experts": 4, "top_k": 2, "every": 2})
    ref = _run(Engine(moe, ServeConfig(**BASE)), prompts, SamplingParams(max_tokens=MAX_NEW))
    cfg = ServeConfig(**SPEC, speculative={"kind": "draft_model", "gamma": 4})
    engine = Engine(moe, cfg, draft_model=tiny(5, d=16, layers=1))
    assert _run(engine, prompts, SamplingParams(max_tokens=MAX_NEW)) == ref


def test_bad_speculative_settings_are_one_line_config_errors(target):
    with pytest.raises(ConfigError, match="decode width of 5"):
        ServeConfig(**BASE, speculative={"gamma": 4})
    with pytest.raises(ConfigError, match="unknown serve.speculative key 'gama'"):
        ServeConfig(**SPEC, speculative={"gama": 4})
    with pytest.raises(ConfigError, match="kind must be one of"):
        ServeConfig(**SPEC, speculative={"kind": "oracle"})
    with pytest.raises(ConfigError, match=r"gamma=2 x tree_width=3 needs a decode width of 7"):
        ServeConfig(**SPEC, speculative={"gamma": 2, "tree_width": 3})  # widths end at 5
    with pytest.raises(ConfigError, match="tree_width must be >= 1"):
        ServeConfig(**SPEC, speculative={"gamma": 2, "tree_width": 0})
    with pytest.raises(ConfigError, match="adaptive chooses chain lengths"):
        ServeConfig(**SPEC, speculative={"gamma": 2, "tree_width": 2, "adaptive": True})
    with pytest.raises(ConfigError, match="acceptance must be one of"):
        ServeConfig(**SPEC, speculative={"acceptance": "always"})
    other_vocab = Transformer(
        dataclasses.replace(tiny(5, d=16, layers=1).cfg, vocab_size=300), nnx.Rngs(0)
    )
    cfg = ServeConfig(**SPEC, speculative={"kind": "draft_model"})
    with pytest.raises(ConfigError, match="vocabulary"):
        Engine(target, cfg, draft_model=other_vocab, warmup=False)
    with pytest.raises(ConfigError, match="needs a draft model"):
        Engine(target, cfg, warmup=False)
    with pytest.raises(ConfigError, match="speculative is off"):
        Engine(target, ServeConfig(**BASE), draft_model=target, warmup=False)


@pytest.mark.parametrize("native", [True, False])
def test_verification_on_either_attention_kernel(target, prompts, plain, native):
    """Verifying drafts (decode slots of L > 1 queries) on the native kernel, one query per
    position over its slot's pages, and on the pure-JAX kernel give the same outputs."""
    cfg = ServeConfig(**SPEC, native_kernels=native, speculative={"gamma": 4})
    engine = Engine(target, cfg)
    assert engine.runner.kernel.native == (native and engine.runner.kernel.native)
    assert _run(engine, prompts, SamplingParams(max_tokens=MAX_NEW)) == plain
    assert any(r.spec_accepted for r in engine.step_records)


def test_entry_points_load_the_draft_from_its_checkpoint(target, prompts, plain, tmp_path):
    """experiments.serving.make_engine loads serve.speculative.draft_checkpoint (here a Hugging
    Face folder) as the draft; without one, kind='draft_model' is a config error."""
    import ml_collections

    from experiments import serving
    from models import hf

    hf.save_model(tiny(5, d=16, layers=1), tmp_path / "draft")
    spec = {"kind": "draft_model", "gamma": 4, "draft_checkpoint": str(tmp_path / "draft")}
    config = ml_collections.ConfigDict({"serve": {**SPEC, "speculative": spec}})
    engine = serving.make_engine(target, config)
    assert engine.spec.drafter.runner.model_cfg.d_model == 16
    assert _run(engine, prompts, SamplingParams(max_tokens=MAX_NEW)) == plain
    config.serve.speculative.draft_checkpoint = ""
    with pytest.raises(ConfigError, match="needs serve.speculative.draft_checkpoint"):
        serving.make_engine(target, config)


def test_sparse_attention_target(prompts):
    """A target with strided and fixed sparse layers (verification takes their sparse paged
    paths), drafting for itself (every draft kept): the non-speculative output."""
    sparse = tiny(3, attention={"pattern": "strided,fixed", "stride": 8, "summary": 2})
    ref = _run(Engine(sparse, ServeConfig(**BASE)), prompts, SamplingParams(max_tokens=MAX_NEW))
    cfg = ServeConfig(**SPEC, speculative={"kind": "draft_model", "gamma": 4})
    engine = Engine(sparse, cfg, draft_model=sparse)
    assert _run(engine, prompts, SamplingParams(max_tokens=MAX_NEW)) == ref
    recs = engine.step_records
    assert sum(r.spec_accepted for r in recs) == sum(r.spec_proposed for r in recs) > 0


@pytest.mark.parametrize(
    "policy", __import__("mlx_sched.serve.policies", fromlist=["names"]).names()
)
def test_every_policy_runs_with_speculation_on(target, prompts, policy):
    """Each registered policy schedules speculating sequences (their draft placeholders are
    positions like any other): greedy outputs equal the same policy without speculation, the
    service a policy counts (VTC's, MLFQ's token counts) is the tokens the requests got."""
    sp = SamplingParams(max_tokens=MAX_NEW)
    base = dict(BASE, policy=policy)
    ref_engine = Engine(target, ServeConfig(**base))
    ref = _run(ref_engine, prompts, sp)
    spec = {"kind": "draft_model", "gamma": 3}
    cfg = ServeConfig(**dict(base, decode_widths=(1, 4)), speculative=spec)
    engine = Engine(target, cfg, draft_model=target)  # every draft accepted
    assert _run(engine, prompts, sp) == ref
    assert sum(r.spec_accepted for r in engine.step_records) > 0
    assert engine.pool.num_in_use == 0 and engine.runner.compiles_since_warmup == 0
    if policy == "vtc":  # accepted tokens count as service, once each
        assert engine.policy.counter == pytest.approx(ref_engine.policy.counter)
