"""The MoE layer: einsum dispatch and dropless serving == a per-token loop, batch invariance,
capacity-limited serving (the V-MoE knob), and config-time errors."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import ConfigError, ModelConfig, Transformer, generate
from models.attention import FullContext
from models.moe import MoE, check_mesh
from models.moe_config import MoEConfig, check_servable


def _cfg(**moe) -> ModelConfig:
    moe = {"num_experts": 4, "min_capacity": 1, **moe}
    return ModelConfig(
        vocab_size=264, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
        max_seq_len=64, init_std=0.2, moe=moe,
    )  # fmt: skip


@nnx.jit(static_argnames=("B", "L", "mode"))
def _run(layer, x_TD, B=0, L=0, mode="eval"):
    """The layer under jit; mode "serve" gets a context with nothing but its mode."""
    if mode == "serve":
        return layer(x_TD, types.SimpleNamespace(mode="serve"))
    return layer(x_TD, FullContext(B, L, jnp.tile(jnp.arange(L), B), mode))


@nnx.jit(static_argnames="mode")
def _forward(model, tokens, mode, rng=None):
    return model(tokens, mode=mode, rng=rng, return_aux=True)


def _expert(layer: MoE, e: int, x_D: np.ndarray) -> np.ndarray:
    g = x_D @ np.asarray(layer.w_gate[...])[e]
    u = x_D @ np.asarray(layer.w_up[...])[e]
    return (g / (1 + np.exp(-g)) * u) @ np.asarray(layer.w_down[...])[e]


def _loop(layer: MoE, x_TD: np.ndarray, group: int) -> np.ndarray:
    """Reference: token by token, the experts its router chose (nothing dropped)."""
    moe = layer.moe
    logits = x_TD @ np.asarray(layer.router[...])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x_TD)
    for t, x in enumerate(x_TD):
        if moe.router == "expert_choice":  # experts that picked t among its group's tokens
            g0 = t - t % group
            C = moe.capacity(group, moe.capacity_factor)
            chosen = [
                e
                for e in range(moe.num_experts)
                if t - g0 in np.argsort(-probs[g0 : g0 + group, e])[:C]
            ]
            gates = probs[t, chosen]
        else:
            chosen = list(np.argsort(-probs[t])[: moe.top_k])
            gates = probs[t, chosen]
            if moe.gates == "topk_softmax":
                gates = gates / gates.sum()
        for e, gate in zip(chosen, gates, strict=True):
            out[t] += gate * _expert(layer, e, x)
    return out


ROUTERS = {
    "switch": dict(top_k=1, capacity_factor=4.0),
    "gshard_top2": dict(top_k=2, gates="topk_softmax", capacity_factor=2.0),
    "top3_softmax": dict(top_k=3, capacity_factor=4.0 / 3),
    "expert_choice": dict(router="expert_choice", capacity_factor=1.5),
}


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_einsum_dispatch_equals_per_token_loop_when_nothing_is_dropped(name):
    layer = MoE(_cfg(**ROUTERS[name]), nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3 * 8, 32))
    y, aux = _run(layer, x, 3, 8)
    if name != "expert_choice":  # cf * k = E: C = S, nothing can be dropped
        assert float(aux["dropped"]) == 0.0
    np.testing.assert_allclose(np.asarray(y), _loop(layer, np.asarray(x), 8), atol=1e-5)


@pytest.mark.parametrize("name", ["switch", "gshard_top2", "expert_choice"])
def test_dropless_serving_equals_per_token_loop(name):
    cfg = _cfg(**{**ROUTERS[name], "capacity_factor": 0.5})  # no part in dropless serving
    layer = MoE(cfg, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (37, 32))
    y, aux = _run(layer, x, mode="serve")
    if name == "expert_choice":  # served through its causal fallback: top-k, softmax gates
        layer.moe = dataclasses.replace(cfg.moe, router="top_k")
    np.testing.assert_allclose(np.asarray(y), _loop(layer, np.asarray(x), 37), atol=1e-5)
    assert float(aux["dropped"]) == 0.0 and float(aux["tokens_per_expert"].sum()) == 37 * (
        cfg.moe.top_k
    )


def test_dropped_tokens_get_zero_output():
    layer = MoE(_cfg(top_k=1, capacity_factor=0.25), nnx.Rngs(0))  # C = 1 of 8 per expert
    x = jax.random.normal(jax.random.key(3), (2 * 8, 32))
    y, aux = _run(layer, x, 2, 8)
    zero = np.abs(np.asarray(y)).max(-1) == 0
    assert float(aux["dropped"]) == pytest.approx(zero.mean()) and 0.4 < zero.mean() < 1


def test_dropless_output_of_a_sequence_ignores_its_batch_companions():
    cfg = _cfg(top_k=2, gates="topk_softmax", capacity_factor=0.5, group_size=0)
    model = Transformer(cfg, nnx.Rngs(0))
    rng = np.random.default_rng(0)
    alone = rng.integers(0, 256, (1, 12))
    others = rng.integers(0, 256, (5, 12))
    batch = np.concatenate([others[:2], alone, others[2:]])
    serve = nnx.jit(lambda m, t: m(t, mode="serve"))
    a = np.asarray(serve(model, jnp.asarray(alone)))[0]
    b = np.asarray(serve(model, jnp.asarray(batch)))[2]
    np.testing.assert_allclose(b, a, atol=1e-5)
    # the same layer on flat tokens: a request's tokens packed with others (serving's view)
    layer = model.layers[1].mlp
    x = jax.random.normal(jax.random.key(4), (50, 32))
    alone, packed = _run(layer, x[7:12], mode="serve")[0], _run(layer, x, mode="serve")[0]
    np.testing.assert_allclose(alone, packed[7:12], atol=1e-6)
    # whereas capacity-limited routing of one big group does depend on the others
    grouped = MoE(_cfg(top_k=1, capacity_factor=0.5, group_size=50), nnx.Rngs(0))
    y = np.asarray(_run(grouped, jnp.tile(x[7:12], (10, 1)), 1, 50)[0])
    assert np.abs(y[:5] - y[45:]).max() > 1e-3  # same tokens, later in the group: dropped


def test_serve_capacity_factor_with_batch_priority_is_a_compute_budget():
    """V-MoE: at inference cf < 1, BPR keeps the most confident tokens; the rest are dropped."""
    cfg = _cfg(top_k=1, serve_capacity_factor=0.5, batch_priority=True)
    layer = MoE(cfg, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(5), (32, 32))
    y, aux = _run(layer, x, mode="serve")
    ref = _loop(layer, np.asarray(x), 32)
    kept = np.abs(np.asarray(y)).max(-1) > 0
    assert float(aux["dropped"]) == pytest.approx(1 - kept.mean()) and kept.sum() <= 16
    np.testing.assert_allclose(np.asarray(y)[kept], ref[kept], atol=1e-5)
    probs = jax.nn.softmax(x @ layer.router[...])
    top, conf = np.argmax(probs, -1), np.max(probs, -1)
    for e in range(4):  # per expert, every kept token is more confident than every dropped one
        mine = top == e
        if (mine & ~kept).any() and (mine & kept).any():
            assert conf[mine & kept].min() >= conf[mine & ~kept].max()


def test_router_metrics_and_losses_are_returned():
    model = Transformer(_cfg(top_k=1, aux_loss_coef=0.1, z_loss_coef=0.01), nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 256)
    _, aux = _forward(model, tokens, "train", jax.random.key(0))
    assert list(aux) == ["layer_1"]  # every=2, offset=1: layer 1 of 2 is the MoE layer
    a = aux["layer_1"]
    assert set(a) == {
        "loss", "aux_loss", "z_loss", "router_entropy", "dropped", "load_imbalance",
        "tokens_per_expert",
    }  # fmt: skip
    assert float(a["loss"]) == pytest.approx(
        0.1 * float(a["aux_loss"]) + 0.01 * float(a["z_loss"]), rel=1e-6
    )
    assert a["tokens_per_expert"].shape == (4,) and float(a["tokens_per_expert"].sum()) == 16
    tpe = a["tokens_per_expert"]
    assert float(a["load_imbalance"]) == pytest.approx(float(tpe.max() / tpe.mean()))


def test_jitter_only_in_training_with_an_rng():
    model = Transformer(_cfg(top_k=1, jitter=0.5, capacity_factor=4.0), nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 256)
    z = lambda mode, rng=None: float(_forward(model, tokens, mode, rng)[1]["layer_1"]["z_loss"])
    assert z("eval") == z("train") != z("train", jax.random.key(0))


@pytest.mark.parametrize(
    "moe, message",
    [
        ({"top_k": 5}, "top_k=5 must be in"),
        ({"capacity_factor": 0.0}, "capacity_factor must be > 0"),
        ({"capacity_factor": -1.0}, "capacity_factor must be > 0"),
        ({"eval_capacity_factor": 0.0}, "eval_capacity_factor must be > 0"),
        ({"router": "hash"}, "router 'hash' not in"),
        ({"second_policy": "random"}, "needs top_k=2"),
        ({"router": "expert_choice", "batch_priority": True}, "expert_choice uses"),
        ({"every": 4, "offset": 3}, "select none of the model's layers"),
        ({"capacity_facter": 1.0}, "did you mean 'capacity_factor'"),
    ],
)
def test_bad_moe_config_is_a_clear_error(moe, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({"n_layers": 2, "moe": {"num_experts": 4, **moe}})


def test_experts_must_divide_the_expert_axis_and_groups_the_mesh():
    cfg = _cfg(num_experts=6)
    with pytest.raises(ConfigError, match="num_experts=6 is not divisible by the 4 devices"):
        check_mesh(cfg, {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}, batch=8, length=16)
    with pytest.raises(ConfigError, match="4 routing groups do not divide over the 8 devices"):
        check_mesh(_cfg(), {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}, batch=4, length=16)
    with pytest.raises(ConfigError, match="do not split into routing groups of 24"):
        check_mesh(_cfg(group_size=24), {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}, 2, 16)
    check_mesh(_cfg(), {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}, batch=8, length=16)


def test_expert_choice_without_causal_fallback_cannot_be_served():
    cfg = _cfg(router="expert_choice", causal_fallback="none")
    with pytest.raises(ConfigError, match="causal_fallback='top_k' to serve it"):
        check_servable(cfg)
    model = Transformer(cfg, nnx.Rngs(0))
    with pytest.raises(ConfigError, match="cannot decode causally"):
        generate.generate(model, [[1, 2, 3]], max_new_tokens=2)
    _forward(model, jnp.ones((1, 4), jnp.int32), "eval")  # training-style routing still works
    check_servable(_cfg(router="expert_choice"))  # the default fallback serves it


def test_moe_config_round_trips_through_json(tmp_path):
    cfg = _cfg(top_k=2, gates="topk_softmax", eval_capacity_factor=2.0)
    assert isinstance(cfg.moe, MoEConfig)
    again = ModelConfig.from_dict(cfg.to_json_dict())
    assert again == cfg and again.to_json_dict() == cfg.to_json_dict()
    assert (
        cfg.moe.capacity_factor_for("eval") == 2.0 and cfg.moe.capacity_factor_for("serve") is None
    )
