"""S-LoRA serving: one base model, many adapters of different ranks in one engine. A batch
mixing adapters equals each adapter's own model; unmerged equals merged; eviction and reload
keep outputs exact; adapters take pages from the KV pool; the prefix cache is keyed by
adapter; no compilation after warm-up; bad adapters and requests are one-line errors."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from tests_serve_common import SERVE

from mlx_sched.serve.adapters import AdapterError
from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.engine import Engine
from mlx_sched.serve.request import RequestError, SamplingParams
from models import ConfigError, ModelConfig, Transformer, lora, lora_peft, lora_pool
from models import generate as reference

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL = (*ATTN, "gate_proj", "up_proj", "down_proj")
CFG = ModelConfig(
    vocab_size=264, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=96
)
# three adapters: (rank, targets)
ADAPTERS = {"a": (2, ("q_proj", "v_proj")), "b": (4, ALL), "c": (8, ("o_proj", "down_proj"))}


def _serve(**lora_cfg):
    return dataclasses.replace(
        SERVE, num_pages=64, lora=dict(max_rank=8, slots=3, targets=ALL) | lora_cfg
    )


@pytest.fixture(scope="module")
def models():
    base = Transformer(CFG, nnx.Rngs(0))
    out = {None: base}
    for i, (name, (rank, targets)) in enumerate(ADAPTERS.items()):
        m = lora.add_adapter(base, dict(rank=rank, alpha=2.0 * rank, targets=targets), seed=i + 1)
        for j, (_, _, _, ad) in enumerate(lora.adapters(m)):
            key = jax.random.fold_in(jax.random.key(10 + i), j)
            ad.b[...] = 0.3 * jax.random.normal(key, ad.b.shape)
        out[name] = m
    return out


def _prompts(n, seed=0, lo=2, hi=20):
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(0, 256, int(k)))) for k in rng.integers(lo, hi, n)]


def _engine(models, **lora_cfg):
    engine = Engine(models[None], _serve(**lora_cfg))
    for name in ADAPTERS:
        engine.register_adapter(name, models[name])
    return engine


def _run(engine, prompts, names, max_tokens=6):
    ids = [
        engine.add_request(p, SamplingParams(max_tokens=max_tokens), adapter=a)
        for p, a in zip(prompts, names, strict=True)
    ]
    with jax.no_tracing(), jax.transfer_guard("disallow"):
        while engine.has_work():
            engine.step()
    return [engine.requests[i].outputs()[0] for i in ids]


def _expected(models, prompts, names, max_tokens=6):
    """Each prompt continued by its own adapter's model (full recompute, one adapter)."""
    out = [None] * len(prompts)
    for name in {*names}:
        idx = [i for i, a in enumerate(names) if a == name]
        got = reference.generate(models[name], [prompts[i] for i in idx], max_tokens)
        for i, g in zip(idx, got, strict=True):
            out[i] = g
    return out


def test_a_batch_mixing_three_adapters_and_none_equals_each_model(models, tmp_path):
    lora_peft.save_adapter(models["c"], tmp_path / "c")
    engine = Engine(models[None], _serve())
    engine.register_adapter("a", models["a"])
    b = lora_pool.read_adapter(models["b"], engine.runner.lora_specs)
    engine.register_adapter("b", b)  # in memory: (config, {(layer, target): (A, B)})
    engine.register_adapter("c", tmp_path / "c")  # a PEFT folder
    prompts = _prompts(8)
    names = ["a", "b", "c", None] * 2
    got = _run(engine, prompts, names)
    assert got == _expected(models, prompts, names)
    # the adapters matter, and no adapter is the base model exactly
    assert got[:3] != reference.generate(models[None], prompts[:3], 6)
    assert engine.runner.compiles_since_warmup == 0


def test_an_adapter_served_unmerged_equals_the_merged_model(models):
    engine = _engine(models)
    prompts = _prompts(4, seed=1)
    got = _run(engine, prompts, ["b"] * 4)
    assert got == reference.generate(lora.merge(models["b"]), prompts, 6)


def test_eviction_and_reload_mid_run_keep_outputs_exact(models):
    engine = _engine(models, slots=2)  # three adapters, two slots
    waves = [["a", "b"], ["c", None, "c"], ["a", "b"], ["c", "a", None], ["b"]]
    prompts = _prompts(sum(map(len, waves)), seed=2)
    names, ids = [n for w in waves for n in w], []
    with jax.no_tracing(), jax.transfer_guard("disallow"):
        for wave in waves:  # requests arrive while others run
            for name in wave:
                p = prompts[len(ids)]
                ids.append(engine.add_request(p, SamplingParams(max_tokens=6), adapter=name))
            engine.step()
            engine.step()
        while engine.has_work():
            engine.step()
    got = [engine.requests[i].outputs()[0] for i in ids]
    assert got == _expected(models, prompts, names)
    stats = engine.adapters.stats()
    assert stats["evictions"] >= 2 and stats["loads"] >= 5 and stats["parked"] == 0
    assert stats["pinned"] == 0 and all(r.adapter_slot == 0 for r in engine.requests.values())
    assert engine.summary(1.0)["adapters"] == stats
    assert engine.runner.compiles_since_warmup == 0
    engine.pool.check()


def test_adapters_take_kv_pages_and_long_contexts_take_them_back(models):
    engine = _engine(models, slots=3)
    pool, ad = engine.pool, engine.adapters
    assert pool.num_in_use == 0 and ad.registry["b"].pages > ad.registry["a"].pages > 0
    _run(engine, _prompts(3, seed=3), ["a", "b", "c"], max_tokens=2)
    held = sum(ad.registry[n].pages for n in ADAPTERS)
    engine.pool.clear_prefix_cache()
    assert pool.num_in_use == held == ad.stats()["pages"]  # idle adapters stay resident
    # a burst of long contexts: the idle adapters' pages go back to the KV cache
    long = [list(range(1, 60)), list(range(2, 61)), list(range(3, 62))]
    assert 3 * pool.pages_for(59 + 6) > pool.num_pages - 1 - held
    assert _run(engine, long, [None] * 3) == reference.generate(models[None], long, 6)
    assert ad.stats()["evictions"] > 0 and ad.stats()["resident"] < 3
    pool.check()
    # a fixed pool reserves slots x (a max-rank adapter's pages) at start-up
    fixed = Engine(models[None], _serve(paging="fixed", slots=2, max_rank=2), warmup=False)
    specs = fixed.runner.lora_specs.items()
    row = sum(int(np.prod(a)) + int(np.prod(b)) for (layer, _), (a, b) in specs if layer == 0)
    page_values = 2 * 4 * CFG.n_kv_heads * CFG.head_dim  # K and V of 4 tokens, one layer
    assert fixed.adapters.pages_for(2) == -(-2 * row // page_values)
    assert fixed.pool.num_in_use == 2 * fixed.adapters.pages_for(2) > 0
    with pytest.raises(RequestError, match="beside 16 adapter pages"):  # 63 - 16 < 49 pages
        fixed.add_request(list(range(1, 90)), SamplingParams(max_tokens=6, n=2))


def test_the_prefix_cache_is_keyed_by_adapter(models):
    engine = _engine(models)
    prompt = list(range(10, 30))  # five pages
    names = ["a", "a", "b", None]
    cached = []
    for name in names:  # one after another: each may find the earlier ones' pages
        rid = engine.add_request(prompt, SamplingParams(max_tokens=3), adapter=name)
        while engine.has_work():
            engine.step()
        cached.append(engine.requests[rid].seqs[0].num_cached)
        assert engine.requests[rid].outputs()[0] == reference.generate(models[name], [prompt], 3)[0]
    assert cached == [0, 16, 0, 0]


def test_bad_adapters_and_requests_are_one_line_errors(models):
    engine = Engine(models[None], _serve(targets=ATTN + ("down_proj",), max_rank=4))
    engine.register_adapter("a", models["a"])
    with pytest.raises(RequestError, match="unknown adapter 'zzz'"):
        engine.add_request([1, 2, 3], SamplingParams(adapter="zzz"))
    with pytest.raises(AdapterError, match="rank 8 exceeds serve.lora.max_rank=4"):
        engine.register_adapter("c8", models["c"])
    with pytest.raises(AdapterError, match=r"targets \['gate_proj', 'up_proj'\] are outside"):
        engine.register_adapter("b4", models["b"])
    with pytest.raises(AdapterError, match="already registered"):
        engine.register_adapter("a", models["a"])
    other = ModelConfig(
        vocab_size=264, d_model=48, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=96
    )
    alien = lora.add_adapter(Transformer(other, nnx.Rngs(0)), dict(rank=2, targets=ATTN))
    with pytest.raises(AdapterError, match=r"another base model"):
        engine.register_adapter("alien", alien)
    assert set(engine.adapters.registry) == {"a"}  # nothing else registered
    assert not engine.has_work()
    rid = engine.add_request([1, 2, 3], adapter="a")  # parked until a step admits it
    with pytest.raises(RequestError, match="adapters do not move"):
        engine.export_request(rid)
    engine.abort(rid)  # a parked request leaves the pool's queue
    assert not engine.has_work() and engine.adapters.stats()["parked"] == 0
    off = ServeConfig(page_size=4, num_pages=16, max_seqs=4, token_budget=16)
    plain = Engine(models[None], off, warmup=False)
    with pytest.raises(RequestError, match="serve.lora is off"):
        plain.add_request([1, 2], adapter="a")
    with pytest.raises(ConfigError, match="not served from a pool"):
        ServeConfig(lora=dict(targets=("router",)))
    with pytest.raises(ConfigError, match="unknown serve.lora key 'rank'"):
        ServeConfig(lora=dict(rank=4))
    with pytest.raises(RequestError, match="adapter must be None"):
        SamplingParams(adapter=3)


def test_pooled_delta_is_each_token_s_own_adapter_and_slot_0_adds_exactly_zero():
    from models.lora_pool import pooled_delta

    eq, rng = "td,dhx->thx", np.random.default_rng(0)
    D, H, X, R, T = 8, 2, 4, 4, 7
    ranks = [0, 1, 2, 4]  # slot 0: the null slot
    a_S, b_S = np.zeros((4, D, R), np.float32), np.zeros((4, R, H, X), np.float32)
    scale_S = np.asarray([0.0, 1.0, 2.0, 0.5], np.float32)
    for s, r in enumerate(ranks):
        a_S[s, :, :r], b_S[s, :r] = rng.normal(size=(D, r)), rng.normal(size=(r, H, X))
    x = rng.normal(size=(T, D)).astype(np.float32)
    slot_T = np.asarray([0, 1, 2, 3, 3, 0, 1], np.int32)
    got = np.asarray(pooled_delta(eq, x, a_S, b_S, scale_S, slot_T, np.float32))
    for t, s in enumerate(slot_T):
        r = ranks[s]
        want = lora.delta(eq, x[t : t + 1], a_S[s, :, :r], b_S[s, :r], scale_S[s], np.float32)
        np.testing.assert_allclose(got[t : t + 1], want, rtol=1e-5, atol=1e-6)
    assert not got[slot_T == 0].any()


@pytest.mark.slow  # four small engines
def test_the_slora_experiment_runs_every_mode():
    from experiments import slora_runs
    from experiments.configs import slora

    config = slora.get_config("runlocal")
    with config.unlocked():
        config.num_adapters, config.workload.requests = (3,), 6
    rows = slora_runs.run_all(config, progress=lambda _: None)["rows"]
    assert [r["mode"] for r in rows] == ["unified", "fixed", "merged"]
    assert all(r["compiles_after_warmup"] == 0 and r["output_tok_s"] > 0 for r in rows)
    assert rows[2]["loads"] >= 1  # the merged mode switched weights
    assert "| 3 | merged |" in slora_runs.table({"rows": rows})


def test_requests_without_adapter_get_the_base_engine_s_logprobs_exactly(models):
    """The pool adds exactly zero for slot 0: base requests beside adapted ones are bitwise
    the engine without a pool."""
    prompts = _prompts(4, seed=5)
    sp = SamplingParams(max_tokens=5, logprobs=True)
    plain = Engine(models[None], dataclasses.replace(_serve(), lora={}))
    want = [o.request.seqs[0].logprobs for o in plain.generate(prompts, sp)]
    engine = _engine(models)
    names = [None, "b"] * 2
    ids = [engine.add_request(p, sp, adapter=a) for p, a in zip(prompts, names, strict=True)]
    ids += [engine.add_request(p, sp) for p in prompts]
    while engine.has_work():
        engine.step()
    got = [engine.requests[i].seqs[0].logprobs for i in ids]
    assert got[4:] == want and got[0] == want[0] and got[2] == want[2]
    assert got[1] != want[1]  # the adapter changes them


def test_adapters_pinned_by_waiting_requests_never_starve_the_head_of_pages(models):
    """Nothing runs, and the head's first chunk does not fit beside the adapters the requests
    behind it pinned: they give their pins back and wait, rather than the head failing."""
    engine = Engine(models[None], dataclasses.replace(_serve(), num_pages=36))
    for name in ADAPTERS:
        engine.register_adapter(name, models[name])
    ad, pool = engine.adapters, engine.pool
    a, b, c = (ad.registry[n].pages for n in "abc")  # 2, 16, 10 pages
    prompt = list(range(1, 85))  # 21 pages: fits beside a, and its first chunk (8) not
    assert pool.num_pages - 1 - a - b - c < pool.pages_for(32)  # beside a + b + c
    names, prompts = ["a", "b", "c"], [prompt, [5, 6, 7], [8, 9]]
    got = _run(engine, prompts, names, max_tokens=2)
    assert [engine.requests[f"req-{i}"].error for i in range(3)] == [None] * 3
    assert got == _expected(models, prompts, names, max_tokens=2)
    pool.check()


def test_bfloat16_pool_beside_packed_base_weights_matches_the_adapted_model():
    """bfloat16 serving: base projections on the packed native matmul (where available),
    adapter deltas on XLA dots. The base request's tokens are exactly the base model's; an
    adapted request's log-probabilities are its model's on the same tokens, up to bfloat16
    rounding (greedy tokens may part ways after a near-tie: the sums run in other orders)."""
    cfg = ModelConfig(
        vocab_size=264, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
        max_seq_len=128, dtype="bfloat16", init_std=0.3,
    )  # fmt: skip
    targets = ("q_proj", "v_proj", "o_proj", "down_proj")
    base = Transformer(cfg, nnx.Rngs(2))
    adapted = lora.add_adapter(base, dict(rank=4, alpha=8.0, targets=targets), seed=1)
    for j, (_, _, _, ad) in enumerate(lora.adapters(adapted)):
        ad.b[...] = (0.3 * jax.random.normal(jax.random.key(j), ad.b.shape)).astype(ad.b.dtype)
    engine = Engine(base, _serve(slots=2, targets=targets))
    engine.register_adapter("x", adapted)
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(0, 256, n))) for n in (5, 19, 33)]
    sp = SamplingParams(max_tokens=6, logprobs=True)
    names = ["x", None, "x"]
    ids = [engine.add_request(p, sp, adapter=a) for p, a in zip(prompts, names, strict=True)]
    while engine.has_work():
        engine.step()
    seqs = [engine.requests[i].seqs[0] for i in ids]
    assert seqs[1].output == reference.generate(base, [prompts[1]], 6)[0]
    for seq, p in ((seqs[0], prompts[0]), (seqs[2], prompts[2])):
        logits = np.asarray(adapted(np.asarray([seq.tokens]), mode="serve")[0], np.float32)
        logp = jax.nn.log_softmax(logits[len(p) - 1 : -1], axis=-1)
        want = np.asarray(logp)[np.arange(6), seq.output]
        np.testing.assert_allclose(seq.logprobs, want, atol=0.05)
    # the adapter matters: the base model gives those tokens other log-probabilities
    logits = np.asarray(base(np.asarray([seq.tokens]), mode="serve")[0], np.float32)
    logp = np.asarray(jax.nn.log_softmax(logits[len(p) - 1 : -1], axis=-1))
    assert np.abs(logp[np.arange(6), seq.output] - np.asarray(seq.logprobs)).max() > 0.2


def test_pooled_delta_by_segment_equals_by_token():
    """A mixed step's segments (decode slots of L tokens, prefill rows by index, padding)
    give each token its own slot's delta."""
    from models.lora_pool import SlotSegments, pooled_delta

    rng = np.random.default_rng(1)
    eq, S, D, R, X = "thx,hxd->td", 4, 6, 3, 4
    a_S = rng.normal(size=(S, 2, X, R)).astype(np.float32)
    b_S = rng.normal(size=(S, R, D)).astype(np.float32)
    a_S[0], b_S[0] = 0, 0
    scale_S = np.asarray([0.0, 1.0, 0.5, 2.0], np.float32)
    dec_slot, L = np.asarray([2, 0, 3], np.int32), 2  # 3 decode slots of 2 tokens
    pre_slot = np.asarray([1, 3, 0], np.int32)  # rows: 3 tokens, 2 tokens, padding
    Tp = 8  # 5 real prefill tokens, 3 padding
    pre_index = np.asarray([[0, 1, 2], [3, 4, Tp], [Tp, Tp, Tp]], np.int32)
    x = rng.normal(size=(3 * L + Tp, 2, X)).astype(np.float32)
    slot_T = np.concatenate([np.repeat(dec_slot, L), [1, 1, 1, 3, 3, 0, 0, 0]]).astype(np.int32)
    segs = SlotSegments(dec_slot, L, pre_slot, pre_index)
    got = np.asarray(pooled_delta(eq, x, a_S, b_S, scale_S, segs, np.float32))
    want = np.asarray(pooled_delta(eq, x, a_S, b_S, scale_S, slot_T, np.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not got[slot_T == 0].any() and got[slot_T != 0].any()


@pytest.mark.parametrize("packed", [False, True])
def test_an_adapter_packed_into_pages_reads_back_and_past_its_rank_is_zero(packed):
    """pack_adapter -> KV pages -> pool_weights gives each slot its own A and B (bfloat16
    rounding in a packed cache); rows past a slot's rank are exactly zero even when its table
    points at pages full of other data (NaN included), and a rank-0 slot adds nothing."""
    import jax.numpy as jnp

    cfg = dataclasses.replace(CFG, n_kv_heads=2)
    Z, K, X = 4, cfg.n_kv_heads, cfg.head_dim // 2 if packed else cfg.head_dim
    storage = np.uint32 if packed else np.float32
    _, layout = lora_pool.attach_pool(Transformer(cfg, nnx.Rngs(0)), ALL, 8, (Z, K, X), packed)
    specs = lora_pool.pool_specs(layout)
    row = dict(layout.rows)[0]
    assert [layout.pages(r) for r in (2, 4, 8)] == [
        -(-r * row // layout.page_values) for r in (2, 4, 8)
    ]
    assert layout.pages(2) < layout.pages(4) < layout.pages(8)  # pages follow the rank
    rng = np.random.default_rng(0)
    ranks, targets = {1: 2, 2: 8}, {1: ("q_proj", "down_proj"), 2: ALL}
    k = rng.normal(size=(cfg.n_layers, 40, Z, K, X)).astype(np.float32).view(np.uint32)
    k = k if packed else k.view(np.float32)
    k[:, 0] = np.float32(np.nan).view(k.dtype)  # the null page: garbage
    v = k.copy()
    table, weights = np.zeros((3, layout.max_pages), np.int32), {}
    for slot, start in ((1, 3), (2, 17)):
        r = ranks[slot]
        weights[slot] = {
            key: (
                rng.normal(size=(*a[:-1], r)).astype(np.float32),
                rng.normal(size=(r, *b[1:])).astype(np.float32),
            )
            for key, (a, b) in specs.items()
            if key[1] in targets[slot]
        }
        kd, vd = lora_pool.pack_adapter(layout, weights[slot], r, storage)
        pages = list(range(start, start + layout.pages(r)))
        k[:, pages], v[:, pages] = kd[:, : len(pages)], vd[:, : len(pages)]
        table[slot, : len(pages)] = pages
    rank_S = np.asarray([0, ranks[1], ranks[2]], np.int32)
    got = lora_pool.pool_weights(layout, k, v, jnp.asarray(table), rank_S, jnp.float32)
    tol = dict(rtol=1e-2, atol=1e-2) if packed else dict(rtol=0, atol=0)
    for key, (a_S, b_S) in got.items():
        a_S, b_S = np.asarray(a_S), np.asarray(b_S)
        assert not a_S[0].any() and not b_S[0].any()  # the null slot
        for slot, r in ranks.items():
            a, b = weights[slot].get(key, (np.zeros((*specs[key][0][:-1], r)), None))
            np.testing.assert_allclose(a_S[slot][..., :r], a, **tol)
            if b is not None:
                np.testing.assert_allclose(b_S[slot][:r], b, **tol)
            assert not a_S[slot][..., r:].any() and not b_S[slot][r:].any()


def test_adapter_weights_live_in_the_kv_pages_they_hold(models):
    """Unified paging: an adapter's pages of the PagePool hold its weights (written into the
    KV arrays); once evicted, those pages serve KV and a reload elsewhere is exact."""
    engine = _engine(models, slots=1)
    pool, ad, runner = engine.pool, engine.adapters, engine.runner
    _run(engine, _prompts(1, seed=7), ["b"], max_tokens=2)
    pages = ad.pages_of["b"]
    assert len(pages) == ad.registry["b"].pages == runner.lora_layout.pages(4)
    assert all(pool.refcount[p] == 1 for p in pages)
    k_data, _ = lora_pool.pack_adapter(
        runner.lora_layout, ad.registry["b"].weights, 4, runner.k.dtype
    )
    np.testing.assert_array_equal(np.asarray(runner.k[:, pages]), k_data[:, : len(pages)])
    prompts = _prompts(3, seed=8)  # "c" evicts "b"; then "b" returns
    assert _run(engine, prompts, ["c", "b", None]) == _expected(models, prompts, ["c", "b", None])
    assert ad.stats()["evictions"] >= 2
    pool.check()


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_adapters_under_preemption_with_parallel_sampling_and_prefix_hits(models, mode):
    """Adapters crossed with preemption, n = 2 seeded sampling, chunked prefill and prefix
    hits on a pool too small to hold everything: outputs equal an engine with room for all,
    the adapters' pages keep their weights, nothing leaks."""
    shared = list(range(40, 56))  # four pages every prompt starts with
    prompts = [shared + p for p in _prompts(6, seed=9, lo=10, hi=30)]
    names = ["a", "b", None, "c", "b", "a"]
    sp = [
        SamplingParams(max_tokens=12, temperature=0.9, top_k=50, n=2, seed=i) if i % 2 else
        SamplingParams(max_tokens=12)
        for i in range(6)
    ]  # fmt: skip

    def run(num_pages):
        serve = dataclasses.replace(_serve(), num_pages=num_pages, preemption=mode)
        engine = Engine(models[None], serve)
        for name in ADAPTERS:
            engine.register_adapter(name, models[name])
        ids = [
            engine.add_request(p, s, adapter=a) for p, s, a in zip(prompts, sp, names, strict=True)
        ]
        with jax.no_tracing(), jax.transfer_guard("disallow"):
            while engine.has_work():
                engine.step()
        outs = [engine.requests[i].outputs() for i in ids]
        preempted = sum(engine.requests[i].preemptions for i in ids)
        return engine, outs, preempted

    roomy, want, none = run(256)
    tight, got, preempted = run(64)
    assert none == 0 and preempted > 0
    assert got == want
    greedy = [i for i in range(6) if i % 2 == 0]
    expected = _expected(models, [prompts[i] for i in greedy], [names[i] for i in greedy], 12)
    assert [got[i][0] for i in greedy] == expected
    assert tight.runner.compiles_since_warmup == 0
    tight.pool.check()
    ad, layout = tight.adapters, tight.runner.lora_layout
    for name, pages in ad.pages_of.items():
        host = ad.registry[name]
        k_data, _ = lora_pool.pack_adapter(layout, host.weights, host.rank, tight.runner.k.dtype)
        np.testing.assert_array_equal(np.asarray(tight.runner.k[:, pages]), k_data[:, : len(pages)])


@pytest.mark.slow  # the 8-device sharded engine
def test_adapters_on_a_sharded_engine_equal_each_model():
    """Adapters in KV pages sharded over a (data 4, tensor 2) mesh, kv heads over tensor."""
    import sharding

    cfg = dataclasses.replace(CFG, n_heads=4, n_kv_heads=2)
    base = Transformer(cfg, nnx.Rngs(3))
    models = {None: base}
    for i, (name, (rank, targets)) in enumerate(ADAPTERS.items()):
        m = lora.add_adapter(base, dict(rank=rank, alpha=2.0 * rank, targets=targets), seed=i)
        for j, (_, _, _, ad) in enumerate(lora.adapters(m)):
            ad.b[...] = 0.3 * jax.random.normal(
                jax.random.fold_in(jax.random.key(i), j), ad.b.shape
            )
        models[name] = m
    mesh = sharding.make_mesh({"data": 4, "tensor": 2})
    engine = Engine(base, _serve(), mesh=mesh)
    for name in ADAPTERS:
        engine.register_adapter(name, models[name])
    assert engine.runner.k.sharding.spec[3] == "tensor"
    prompts, names = _prompts(6, seed=11), ["a", "b", "c", None, "b", "a"]
    assert _run(engine, prompts, names) == _expected(models, prompts, names)
    assert engine.runner.compiles_since_warmup == 0
