"""Co-serving (FineInfer): tuning MoE routers while the same model serves."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from tests_serve_common import SERVE

from mlx_sched.cotrain import CoServeConfig, CoServer, Tuner, TunerConfig
from mlx_sched.lab.workload import TraceRequest
from mlx_sched.serve.engine import Engine
from mlx_sched.serve.request import SamplingParams
from models import ModelConfig, Transformer
from models.config import ConfigError


def _moe_cfg(**kw):
    moe = dict(num_experts=4, top_k=1, every=1, offset=0)
    return ModelConfig.from_dict(
        dict(
            vocab_size=264,
            d_model=32,
            n_layers=2,
            n_heads=2,
            n_kv_heads=1,
            d_ff=64,
            max_seq_len=96,
            moe=moe,
            **kw,
        )
    )


def _batches(seed=0, batch=4, length=24):
    rng = np.random.default_rng(seed)
    # a learnable stream: each window counts up from a random start
    while True:
        start = rng.integers(0, 200, (batch, 1))
        yield ((start + np.arange(length + 1)[None]) % 256).astype(np.int32)


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(0, 256, int(k)))) for k in rng.integers(2, 20, n)]


def _flat(state):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def test_tuner_trains_only_the_routers():
    model = Transformer(_moe_cfg(), nnx.Rngs(0))
    before = _flat(nnx.state(model, nnx.Param))
    tuner = Tuner(model, TunerConfig(lr=1e-2, batch_size=4, seq_len=24))
    names = {p[-1] for p in _flat(tuner.trainable)}
    assert names == {"router"} and len(_flat(tuner.trainable)) == 2
    opt_leaves = sum(x.size for x in jax.tree.leaves(tuner.opt_state))
    assert opt_leaves <= 2 * tuner.num_trainable + 8  # Adam's two moments (+ counters) only
    batch = next(_batches())
    first = tuner.evaluate(batch)["ce"]
    for _ in range(20):
        tuner.step(batch)
    assert tuner.version == 20
    assert tuner.evaluate(batch)["ce"] < first  # the routers alone fit the batch better
    after = _flat(nnx.state(tuner.model(), nnx.Param))
    for path, value in before.items():
        if path[-1] == "router":
            assert not np.array_equal(value, after[path])
        else:
            np.testing.assert_array_equal(value, after[path])  # frozen, bit for bit


def test_tuner_config_errors():
    with pytest.raises(ConfigError, match="targets"):
        TunerConfig(targets=("q_proj",))
    with pytest.raises(ConfigError, match="lr"):
        TunerConfig(lr=0)
    with pytest.raises(ConfigError, match=r"tuner\.batch_size must be > 0, got 0"):
        TunerConfig(batch_size=0)
    with pytest.raises(ConfigError, match=r"tuner\.weight_decay must be >= 0, got -0.1"):
        TunerConfig(weight_decay=-0.1)
    with pytest.raises(ConfigError, match=r"tuner\.b2 must be in \[0, 1\), got 1.0"):
        TunerConfig(b2=1.0)
    TunerConfig(b1=0.0, b2=0.0, weight_decay=0.0)  # the closed ends are allowed
    with pytest.raises(ConfigError, match="unknown"):
        TunerConfig.from_dict({"rate": 1})
    dense = Transformer(dataclasses.replace(_moe_cfg(), moe=None), nnx.Rngs(0))
    with pytest.raises(ConfigError, match="no router"):
        Tuner(dense)
    with pytest.raises(ConfigError, match="deferral_s"):
        CoServeConfig(deferral_s=-1)
    with pytest.raises(ConfigError, match="mode"):
        CoServeConfig(mode="both")


def test_engine_update_params_serves_like_a_fresh_engine():
    """Routers updated in place: no recompilation, outputs equal an engine built with the new
    parameters, the prefix cache (KV of the old routers) is dropped."""
    model = Transformer(_moe_cfg(), nnx.Rngs(1))
    tuner = Tuner(model, TunerConfig(lr=5e-2))
    engine = Engine(tuner.model(), SERVE)
    prompts = _prompts(5)
    sp = SamplingParams(max_tokens=6)
    engine.generate(prompts, sp)  # fills the prefix cache with the old routers' KV
    batches = _batches(1)
    for _ in range(5):
        tuner.step(next(batches))
    assert engine.update_params(tuner.trainable) == 2
    got = [o.outputs[0] for o in engine.generate(prompts, sp)]
    fresh = [o.outputs[0] for o in Engine(tuner.model(), SERVE).generate(prompts, sp)]
    assert got == fresh
    assert engine.runner.compiles_since_warmup == 0
    engine.pool.check()


def test_engine_update_params_refuses_bad_updates():
    model = Transformer(_moe_cfg(), nnx.Rngs(1))
    engine = Engine(model, SERVE)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    router = next(p for p in flat if p[-1] == "router")
    with pytest.raises(ValueError, match="shape"):
        engine.update_params({router: np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match="no parameter"):
        engine.update_params({("nope",): np.zeros(3)})
    with pytest.raises(ValueError, match="embedding"):
        engine.update_params({("embed",): flat[("embed",)].get_value()})
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=8))
    engine.step()
    with pytest.raises(RuntimeError, match="running"):
        engine.update_params({router: flat[router].get_value()})


class _Clock:
    """A clock that each tuning step and engine step advances by a fixed cost."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, dt):
        self.now += dt


def _coserver(cfg, clock, train_cost=0.3, step_cost=0.05, seed=2):
    model = Transformer(_moe_cfg(), nnx.Rngs(seed))
    tuner = Tuner(model, TunerConfig(lr=2e-2))
    engine = Engine(tuner.model(), SERVE, clock=clock)
    real_step, real_train = engine.step, tuner.step

    def step():
        clock.now += step_cost
        return real_step()

    def train(batch):
        clock.now += train_cost
        return real_train(batch)

    engine.step, tuner.step = step, train
    return CoServer(engine, tuner, _batches(3), cfg, sleep=clock.sleep)


def _trace(n, rate, seed=0):
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1 / rate, n))
    return [
        TraceRequest(float(t), p, int(m))
        for t, p, m in zip(times, _prompts(n, seed), rng.integers(2, 8, n), strict=True)
    ]


@pytest.mark.parametrize("deferral", [0.0, 0.5])
def test_coserving_defers_at_most_one_step_and_serves_each_version_exactly(deferral):
    clock = _Clock()
    co = _coserver(CoServeConfig(deferral_s=deferral), clock)
    trace = _trace(12, rate=1.0)
    result = co.run(trace)
    assert result["serving"]["finished"] == len(trace)
    assert result["train_steps"] > 0 and result["updates"] > 0
    # no tuning step starts once the oldest waiting request has waited the deferral bound
    firsts = {m["id"]: m for m in co.served}
    sched = sorted((co._start + trace[int(i[1:])].arrival, m["ttft"]) for i, m in firsts.items())
    assert len(sched) == len(trace)
    for step in co.train_log:
        for arrival, ttft in sched:
            first_token = arrival + ttft
            waited = step["t0"] - arrival
            assert not (waited >= deferral and first_token > step["t0"]), (step, arrival)
    # so no request waits longer than the bound plus one tuning step (plus its own first step)
    assert max(m["ttft"] for m in co.served) <= deferral + 0.3 + 0.05 * 8
    # the outputs of every version equal a fresh engine's with that version's parameters
    by_version = {}
    for rid, v in co.request_version.items():
        by_version.setdefault(v, []).append(int(rid[1:]))
    assert len(by_version) > 1
    for v, idx in by_version.items():
        fresh = Engine(co.tuner.model(co.versions[v]), SERVE)
        want = fresh.generate(
            [trace[i].prompt for i in idx],
            [SamplingParams(max_tokens=trace[i].max_tokens, ignore_eos=True, seed=i) for i in idx],
        )
        got = [co.engine.requests[f"r{i}"].outputs()[0] for i in idx]
        assert got == [w.outputs[0] for w in want], v
    assert co.engine.runner.compiles_since_warmup == 0


def test_serve_only_and_train_only_baselines():
    clock = _Clock()
    co = _coserver(CoServeConfig(mode="serve_only"), clock)
    result = co.run(_trace(5, rate=2.0))
    assert result["train_steps"] == 0 and result["updates"] == 0
    assert result["serving"]["finished"] == 5
    clock = _Clock()
    co = _coserver(CoServeConfig(mode="train_only", train_only_s=2.9), clock)
    result = co.run(_trace(5, rate=2.0))
    assert result["train_steps"] == 10 and result["serving"] == {}


def test_norm_targets_and_snapshot_independence():
    model = Transformer(_moe_cfg(), nnx.Rngs(0))
    tuner = Tuner(model, TunerConfig(targets=("norm",), lr=1e-2))
    names = {tuple(map(str, p[-2:])) for p in _flat(tuner.trainable)}
    assert names == {("attn_norm", "scale"), ("mlp_norm", "scale"), ("final_norm", "scale")}
    snap = tuner.snapshot()
    tuner.step(next(_batches()))
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(_flat(snap).values(), _flat(tuner.trainable).values(), strict=True)
    ]
    assert any(changed)  # the step moved the norms; the snapshot kept the old values


def test_clear_prefix_cache_frees_cached_pages():
    from mlx_sched.serve.paging import PagePool, hash_chain

    pool = PagePool(8, 4)
    pages = pool.allocate(3)
    for p, h in zip(pages, hash_chain(list(range(12)), 4), strict=True):
        pool.register(p, h)
    pool.free(pages[:2])  # two cached, one still in use (with a hash)
    assert pool.stats().cached == 2
    assert pool.clear_prefix_cache() == 2
    assert pool.stats().cached == 0 and pool.num_available == 6
    assert pool.lookup(hash_chain(list(range(12)), 4)) == []  # nothing matches any more
    pool.free(pages[2:])
    pool.check()
    assert pool.num_available == 7


def test_coserving_a_lora_adapter_serves_each_version_exactly():
    """FineInfer with a LoRA adapter as the tuned part: only the adapter trains, and what the
    engine serves after each update equals a fresh engine with that version's adapter."""
    from models import lora

    base = Transformer(_moe_cfg(), nnx.Rngs(4))
    model = lora.add_adapter(base, {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]})
    tuner = Tuner(model, TunerConfig(targets=("lora",), lr=5e-2))
    trainable = list(nnx.to_flat_state(tuner.trainable))
    assert len(trainable) == len(list(nnx.to_flat_state(nnx.state(model, lora.LoraParam))))
    assert trainable and all(isinstance(v, lora.LoraParam) for _, v in trainable)
    clock = _Clock()
    engine = Engine(tuner.model(), SERVE, clock=clock)
    co = CoServer(engine, tuner, _batches(5), CoServeConfig(deferral_s=0.2), sleep=clock.sleep)
    real_train = tuner.step

    def train(batch):
        clock.now += 0.3
        return real_train(batch)

    tuner.step = train
    trace = _trace(6, rate=1.0, seed=1)
    result = co.run(trace)
    assert result["serving"]["finished"] == 6 and result["updates"] > 0
    for rid, v in co.request_version.items():
        i = int(rid[1:])
        fresh = Engine(co.tuner.model(co.versions[v]), SERVE)
        (want,) = fresh.generate(
            [trace[i].prompt], SamplingParams(max_tokens=trace[i].max_tokens, ignore_eos=True)
        )
        assert co.engine.requests[rid].outputs()[0] == want.outputs[0]
    assert engine.runner.compiles_since_warmup == 0
