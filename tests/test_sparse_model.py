"""Sparse attention in the model: per-layer config, errors, causality, training, sharding."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import sharding
from mlx_sched.train import loop
from mlx_sched.train.steps import train_step
from models import ConfigError, ModelConfig, Transformer
from models.attention_config import AttentionConfig
from models.patterns import DenseCausal, pattern_for_layer
from models.sparse_attention import Fixed, Strided, make_pattern


def sparse_cfg(tiny_cfg, n_layers: int = 2, **attention) -> ModelConfig:
    return ModelConfig(**{**tiny_cfg.to_dict(), "n_layers": n_layers, "attention": attention})


def test_patterns_per_layer_from_config(tiny_cfg):
    cfg = sparse_cfg(tiny_cfg, 4, pattern="strided, dense", stride=8, summary=2, heads="union")
    got = [pattern_for_layer(cfg, i) for i in range(4)]
    assert got == [Strided(8, 4, "union"), DenseCausal(), Strided(8, 4, "union"), DenseCausal()]
    cfg = sparse_cfg(tiny_cfg, pattern="fixed", stride=8, summary=2)
    assert pattern_for_layer(cfg, 1) == Fixed(8, 4, "interleave", 2)
    assert pattern_for_layer(tiny_cfg, 0) == DenseCausal()  # the default stays dense
    assert make_pattern("strided", 4, 1, "union", 2) == Strided(4, 2, "union")


def test_attention_config_round_trips_through_dicts_json_and_configdicts(tiny_cfg):
    cfg = sparse_cfg(tiny_cfg, pattern="strided,fixed", stride=16, summary=4, heads="union")
    assert isinstance(cfg.attention, AttentionConfig)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_json_dict()["attention"] == {
        "pattern": "strided,fixed",
        "stride": 16,
        "summary": 4,
        "heads": "union",
    }
    as_configdict = ml_collections.ConfigDict(cfg.to_json_dict())
    assert ModelConfig.from_dict(as_configdict) == cfg
    assert AttentionConfig.from_any(cfg.attention) is cfg.attention


@pytest.mark.parametrize(
    "attention, message",
    [
        ({"stride": 0}, "stride must be > 0"),
        ({"stride": -3}, "stride must be > 0"),
        ({"stride": 4, "summary": 5}, "summary=5 must be <= stride=4"),
        ({"summary": 0}, "summary must be > 0"),
        ({"pattern": "sparse"}, "unknown pattern 'sparse'"),
        ({"pattern": "strided,,dense"}, "empty entry"),
        ({"pattern": "strided,dense,fixed"}, "3 patterns for 2 layers"),
        ({"heads": "both"}, "heads='both' is not one of"),
        ({"strid": 4}, "did you mean 'stride'"),
    ],
)
def test_bad_attention_config_is_a_clear_config_error(tiny_cfg, attention, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**tiny_cfg.to_dict(), "attention": attention})


def test_other_config_errors(tiny_cfg):
    with pytest.raises(ConfigError, match="needs n_heads >= 2"):
        ModelConfig(n_heads=1, n_kv_heads=1, attention={"pattern": "fixed"})
    ModelConfig(n_heads=1, n_kv_heads=1, attention={"pattern": "fixed", "heads": "union"})
    with pytest.raises(ConfigError, match="must be a mapping"):
        ModelConfig(attention="strided")
    with pytest.raises(ConfigError, match="out of range"):
        pattern_for_layer(tiny_cfg, 2)
    with pytest.raises(ConfigError, match="out of range"):
        pattern_for_layer(tiny_cfg, -1)
    with pytest.raises(ConfigError, match="summary=9 must be in"):
        Fixed(8, 4, "union", 9)
    with pytest.raises(ConfigError, match="stride must be > 0"):
        Strided(0, 4)
    with pytest.raises(ConfigError, match="unknown sparse pattern"):
        make_pattern("dense", 4, 1, "union", 4)


@pytest.mark.parametrize("kind", ["strided", "fixed"])
def test_one_sparse_layer_sees_exactly_its_pattern(tiny_cfg, kind):
    """With one layer, d logits[i] / d inputs[j] != 0 exactly for j in needed_positions(i)."""
    cfg = sparse_cfg(tiny_cfg, 1, pattern=kind, stride=4, summary=2)
    model = Transformer(cfg, nnx.Rngs(0))
    pattern = pattern_for_layer(cfg, 0)
    L = 14
    tokens = jax.random.randint(jax.random.key(1), (1, L), 0, 256)
    emb = model.embed_tokens(tokens.reshape(-1)).reshape(1, L, -1)
    jac = jax.jit(jax.jacrev(lambda e: jnp.sum(model(tokens, embeddings_BLD=e)[0] ** 2, axis=-1)))(
        emb
    )  # [L, 1, L, D]
    seen = np.abs(np.asarray(jac)[:, 0]).max(axis=-1) > 0
    for i in range(L):
        np.testing.assert_array_equal(np.flatnonzero(seen[i]), pattern.needed_positions(i))


def test_model_with_sparse_layers_trains(tiny_cfg):
    cfg = sparse_cfg(tiny_cfg, pattern="fixed,strided", stride=8, summary=2, heads="union")
    tc = loop.TrainConfig(steps=25, warmup_steps=2, lr=1e-2)
    tx = loop.make_optimizer(tc)
    graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)), nnx.Param)
    step = jax.jit(functools.partial(train_step, graphdef, tx, 0))
    # periodic sequences with a long period: predictable only from far-back tokens
    period = np.random.default_rng(0).integers(0, 256, (4, 12))
    batch = jnp.asarray(np.tile(period, 4)[:, :45], jnp.int32)
    opt, losses = tx.init(params), []
    for s in range(tc.steps):
        params, opt, m = step(params, opt, batch, jnp.int32(s))
        losses.append(float(m["loss"]))
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] - 2.0, losses


def test_sparse_model_sharded_equals_single_device(tiny_cfg):
    cfg = sparse_cfg(tiny_cfg, pattern="strided,fixed", stride=4, summary=2)
    model = Transformer(cfg, nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (8, 18), 0, 256)
    graphdef, params = nnx.split(model, nnx.Param)
    fwd = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
    ref = np.asarray(fwd(params, tokens))
    mesh = sharding.make_mesh({"data": 2, "tensor": 4})
    placed = sharding.place(params, sharding.state_shardings(mesh, params))
    with jax.set_mesh(mesh):
        out = fwd(placed, tokens)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5)
