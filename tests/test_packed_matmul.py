"""The native packed matmul: packing, products against einsum, row independence, and the
serving engine on packed weights against the same engine on XLA's dot."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import ModelConfig, Transformer, packed_matmul
from models.layers import dot

pytestmark = pytest.mark.skipif(
    not packed_matmul.available(), reason="no C++ compiler: serving uses XLA's dot"
)

SHAPES = {  # eq: (x shape, w shape), as the model uses them
    "td,dhx->thx": ((13, 64), (64, 4, 16)),
    "thx,hxd->td": ((13, 4, 16), (4, 16, 96)),
    "td,df->tf": ((13, 64), (64, 160)),
    "tf,fd->td": ((13, 160), (160, 64)),
    "td,vd->tv": ((13, 64), (320, 64)),
    "td,dv->tv": ((13, 64), (64, 320)),
}
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-5}  # both accumulate in float32


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("eq", sorted(SHAPES))
def test_packed_dot_matches_einsum(eq, dtype):
    rng = np.random.default_rng(0)
    xs, ws = SHAPES[eq]
    w = jnp.asarray(rng.normal(size=ws), dtype)
    p = packed_matmul.pack(w, eq)
    assert packed_matmul.is_packed(p) and p.size == w.size
    for m in (1, 13, 16, 33, 70):  # register-block and AMX-tile tails
        x = jnp.asarray(rng.normal(size=(m, *xs[1:])), dtype)
        ref = jnp.einsum(eq, x, w, preferred_element_type=jnp.float32)
        got = jax.jit(lambda x, p: packed_matmul.packed_dot(eq, x, p))(x, p)
        assert got.shape == ref.shape and got.dtype == jnp.float32
        scale = float(jnp.max(jnp.abs(ref)))
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=TOL[dtype] * scale)
        # the model's dot sends a packed weight here, in the compute dtype
        via_dot = jax.jit(lambda x, p: dot(eq, x, p, dtype))(x, p)
        np.testing.assert_array_equal(np.asarray(via_dot), np.asarray(got.astype(dtype)))


def test_bfloat16_results_round_as_xla_converts():
    """The kernel's bfloat16 results equal XLA's conversion of its float32 results, bit for
    bit: ties to even, values that round up to inf, subnormals (x @ I is exact); a row with
    inf or NaN (inf * 0 = NaN) gives NaN where XLA's result is NaN."""
    tie, big = 1 + 2.0**-8, float(np.finfo(np.float32).max)
    special = [tie, -tie, 1 + 3 * 2.0**-8, big, -big, 1e-40, -0.0, 3.0e38]
    rng = np.random.default_rng(4)
    x = rng.normal(size=(37, 64)).astype(np.float32)
    x[3, : len(special)] = special
    x[5, 7], x[6, 9] = np.inf, np.nan
    eye = packed_matmul.pack(jnp.eye(64, dtype=jnp.float32), "td,df->tf")
    f = jax.jit(lambda x, w: packed_matmul.packed_dot("td,df->tf", x, w, jnp.bfloat16))
    got = np.asarray(f(jnp.asarray(x), eye))
    want = np.asarray(jax.jit(lambda x, w: packed_matmul.packed_dot("td,df->tf", x, w))(x, eye))
    want = np.asarray(jnp.asarray(want).astype(jnp.bfloat16))
    assert got.dtype == want.dtype == jnp.bfloat16
    nan = np.isnan(want.astype(np.float32))
    assert nan[5:7].any() and not nan[:5].any()
    np.testing.assert_array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan])
    assert np.all(np.isnan(got.astype(np.float32)[nan]))
    with pytest.raises(ValueError, match="output dtype"):
        packed_matmul.packed_dot("td,df->tf", jnp.asarray(x), eye, jnp.float16)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_a_rows_product_does_not_depend_on_the_other_rows(dtype):
    rng = np.random.default_rng(1)
    w = packed_matmul.pack(jnp.asarray(rng.normal(size=(96, 128)), dtype), "td,df->tf")
    x = jnp.asarray(rng.normal(size=(64, 96)), dtype)
    f = jax.jit(lambda x, w: packed_matmul.packed_dot("td,df->tf", x, w))
    full = np.asarray(f(x, w))
    for rows in (slice(0, 1), slice(5, 18), slice(30, 64)):
        np.testing.assert_array_equal(np.asarray(f(x[rows], w)), full[rows])


def test_weights_that_do_not_fill_panels_stay_unpacked():
    w = jnp.ones((64, 48), jnp.float32)  # N = 48: not a multiple of 32
    assert packed_matmul.pack(w, "td,df->tf") is w
    odd_k = jnp.ones((63, 64), jnp.bfloat16)  # bfloat16 pairs need an even K
    assert packed_matmul.pack(odd_k, "td,df->tf") is odd_k
    assert packed_matmul.pack(jnp.ones((64, 64), jnp.int32), "td,df->tf").dtype == jnp.int32


def test_pack_params_packs_projections_and_head_not_norms_or_experts():
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                      max_seq_len=64, moe={"num_experts": 4, "every": 2})  # fmt: skip
    _, params = nnx.split(Transformer(cfg, nnx.Rngs(0)), nnx.Param)
    packed = packed_matmul.pack_params(params, tie_embeddings=cfg.tie_embeddings)
    flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(packed)}

    def is_packed(name):
        v = flat[name]
        return packed_matmul.is_packed(v.get_value() if hasattr(v, "get_value") else v.value)

    assert all(is_packed(f"layers/0/attn/{w}") for w in ("wq", "wk", "wv", "wo"))
    assert all(is_packed(f"layers/0/mlp/{w}") for w in ("w_gate", "w_up", "w_down"))
    assert is_packed("embed") == cfg.tie_embeddings

    assert not is_packed("layers/0/attn_norm/scale")
    moe_layer = [n for n in flat if n.endswith("mlp/w_gate") and not is_packed(n)]
    assert moe_layer, "the MoE layer's experts must stay on ragged_dot"
    untied = dataclasses.replace(cfg, tie_embeddings=False)
    _, params = nnx.split(Transformer(untied, nnx.Rngs(0)), nnx.Param)
    flat = dict(nnx.to_flat_state(packed_matmul.pack_params(params, tie_embeddings=False)))
    value = lambda v: v.get_value() if hasattr(v, "get_value") else v.value  # noqa: E731
    assert packed_matmul.is_packed(value(flat[("lm_head",)]))
    assert not packed_matmul.is_packed(value(flat[("embed",)]))  # lookups only


@pytest.mark.parametrize("dtype,tied", [("float32", True), ("bfloat16", True), ("float32", False)])
def test_engine_on_packed_weights_matches_xla_dot(dtype, tied):
    from mlx_sched.serve.config import ServeConfig
    from mlx_sched.serve.engine import Engine
    from mlx_sched.serve.request import SamplingParams

    cfg = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                      max_seq_len=128, dtype=dtype, tie_embeddings=tied)  # fmt: skip
    model = Transformer(cfg, nnx.Rngs(0))
    serve = ServeConfig(page_size=8, num_pages=64, max_seqs=16, token_budget=64,
                        prefill_buckets=(64,))  # fmt: skip
    packed = Engine(model, serve)
    plain = Engine(model, dataclasses.replace(serve, packed_matmuls=False))
    assert packed.runner.packed_matmuls and not plain.runner.packed_matmuls
    head = "embed" if tied else "lm_head"
    assert packed_matmul.is_packed(packed.runner.params[head][...])
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(1, 512, n))) for n in (5, 17, 40, 9, 33)]
    sp = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=True)
    a, b = packed.generate(prompts, sp), plain.generate(prompts, sp)
    assert [o.outputs[0] for o in a] == [o.outputs[0] for o in b]
    tol = 1e-4 if dtype == "float32" else 5e-2
    for x, y in zip(a, b, strict=True):
        lx, ly = x.request.seqs[0].logprobs, y.request.seqs[0].logprobs
        assert len(lx) == len(ly) == 12
        np.testing.assert_allclose(lx, ly, atol=tol)
    assert packed.runner.compiles_since_warmup == 0
