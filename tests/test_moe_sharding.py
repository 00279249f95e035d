"""Expert parallelism on 8 CPU devices: sharded == single device (forward, gradients, serving),
and exactly two all-to-alls (no all-gather) in the compiled forward."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sharding
from models import ModelConfig, Transformer

MESHES = {
    "data2_expert4": {"data": 2, "expert": 4},
    "expert8": {"expert": 8},
    "expert2_tensor2": {"data": 2, "expert": 2, "tensor": 2},
}
SLOW = pytest.mark.slow


def _model(**moe) -> Transformer:
    moe = {"num_experts": 8, "min_capacity": 1, **moe}
    cfg = ModelConfig(
        vocab_size=264, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
        max_seq_len=64, init_std=0.1, moe=moe,
    )  # fmt: skip
    return Transformer(cfg, nnx.Rngs(0))


def _placed(model, mesh):
    _, params = nnx.split(model, nnx.Param)
    return sharding.place(params, sharding.state_shardings(mesh, params))


def _loss_fn(graphdef):
    def loss(params, tokens, rng):
        logits, aux = nnx.merge(graphdef, params)(tokens, mode="train", rng=rng, return_aux=True)
        return jnp.mean(logits**2) + aux["layer_1"]["loss"], aux["layer_1"]

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.fixture(scope="module")
def gshard():
    """Top-2 with every stochastic part on (jitter, random second expert) and overflow."""
    model = _model(
        top_k=2, gates="topk_softmax", second_policy="random", capacity_factor=0.75,
        jitter=0.1, batch_priority=True,
    )  # fmt: skip
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, 256)
    graphdef, params = nnx.split(model, nnx.Param)
    f = _loss_fn(graphdef)
    return model, tokens, f, f(params, tokens, jax.random.key(7))


@pytest.mark.parametrize(
    "layout", ["data2_expert4", "expert8", pytest.param("expert2_tensor2", marks=SLOW)]
)
def test_sharded_forward_and_gradients_equal_single_device(gshard, layout):
    model, tokens, f, ((ref_loss, ref_aux), ref_grads) = gshard
    assert 0 < float(ref_aux["dropped"]) < 0.5  # the capacity limit bites
    mesh = sharding.make_mesh(MESHES[layout])
    params = _placed(model, mesh)
    with jax.set_mesh(mesh):
        tok = jax.device_put(tokens, sharding.named_sharding(mesh, ("act_batch", None)))
        (loss, aux), grads = f(params, tok, jax.random.key(7))
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    for k in ref_aux:
        np.testing.assert_allclose(np.asarray(aux[k]), np.asarray(ref_aux[k]), rtol=1e-5, err_msg=k)
    flat = lambda g: {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(g)}
    got, ref = flat(grads), flat(ref_grads)
    scale = max(np.abs(v).max() for v in ref.values())
    assert np.abs(ref[("layers", 1, "mlp", "w_up")]).max() > 1e-3 * scale  # experts learn
    for path in ref:
        np.testing.assert_allclose(got[path], ref[path], atol=1e-5 * scale, err_msg=str(path))
    w = params["layers"][1]["mlp"]["w_gate"][...]
    assert w.sharding.spec[0] == "expert"  # experts really live on the expert axis


def _collectives(hlo: str, op: str) -> int:
    return len(re.findall(rf"\s{op}(-start)?\(", hlo))


@pytest.mark.parametrize("router", ["switch", "expert_choice"])
@pytest.mark.parametrize("layout", ["data2_expert4", "expert8"])
def test_compiled_forward_has_two_all_to_alls_and_no_all_gather(layout, router):
    fields = {"router": "expert_choice"} if router == "expert_choice" else {"top_k": 1}
    model = _model(**fields, jitter=0.1)
    mesh = sharding.make_mesh(MESHES[layout])
    graphdef, _ = nnx.split(model, nnx.Param)
    params = _placed(model, mesh)
    tokens = jax.device_put(
        jnp.zeros((8, 16), jnp.int32), sharding.named_sharding(mesh, ("act_batch", None))
    )
    fwd = lambda p, t, r: nnx.merge(graphdef, p)(t, mode="train", rng=r, return_aux=True)
    with jax.set_mesh(mesh):
        hlo = jax.jit(fwd).lower(params, tokens, jax.random.key(0)).compile().as_text()
    assert _collectives(hlo, "all-to-all") == 2
    assert _collectives(hlo, "all-gather") == 0
    assert _collectives(hlo, "all-reduce") > 0  # the router metrics are reduced, not gathered


def test_sharded_dropless_serving_equals_single_device():
    model = _model(top_k=2, gates="topk_softmax")
    tokens = jax.random.randint(jax.random.key(2), (8, 12), 0, 256)
    graphdef, params = nnx.split(model, nnx.Param)
    serve = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t, mode="serve"))
    ref = np.asarray(serve(params, tokens))
    mesh = sharding.make_mesh(MESHES["data2_expert4"])
    with jax.set_mesh(mesh):
        out = serve(_placed(model, mesh), tokens)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
