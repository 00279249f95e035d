"""The dense Transformer: shapes, causality, dtypes, config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import ConfigError, ModelConfig, Transformer
from models.attention_core import causal_attention


def test_logits_shape_and_finite(tiny_cfg):
    model = Transformer(tiny_cfg, nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 17), 0, tiny_cfg.vocab_size)
    logits = model(tokens)
    assert logits.shape == (3, 17, tiny_cfg.vocab_size)
    assert logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    logits2, aux = model(tokens, return_aux=True)
    np.testing.assert_array_equal(logits, logits2)
    assert aux == {}


def test_causality_gradient_is_zero_for_later_positions(tiny_cfg):
    """d logits[:, i] / d embeddings[:, j] == 0 for every j > i, and nonzero for j <= i."""
    model = Transformer(tiny_cfg, nnx.Rngs(0))
    B, L, i = 2, 12, 5
    tokens = jax.random.randint(jax.random.key(1), (B, L), 0, tiny_cfg.vocab_size)
    emb = model.embed_tokens(tokens.reshape(-1)).reshape(B, L, -1)

    def early_loss(e):
        return jnp.sum(model(tokens, embeddings_BLD=e)[:, i] ** 2)

    g = np.asarray(jax.grad(early_loss)(emb))
    assert np.abs(g[:, i + 1 :]).max() == 0.0
    assert np.abs(g[:, : i + 1]).max(axis=(0, 2)).min() > 0.0


def test_later_tokens_do_not_change_earlier_logits(tiny_cfg):
    model = Transformer(tiny_cfg, nnx.Rngs(0))
    tokens = np.array(jax.random.randint(jax.random.key(1), (2, 10), 0, 256))
    a = np.asarray(model(jnp.asarray(tokens)))
    tokens[:, 6:] = (tokens[:, 6:] + 7) % 256
    b = np.asarray(model(jnp.asarray(tokens)))
    np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert np.abs(a[:, 6:] - b[:, 6:]).max() > 1e-3


def test_causal_attention_matches_naive_loop(naive_attention):
    rng = np.random.default_rng(0)
    B, L, H, K, X = 2, 7, 4, 2, 8
    q = rng.normal(size=(B, L, H, X)).astype(np.float32)
    k = rng.normal(size=(B, L, K, X)).astype(np.float32)
    v = rng.normal(size=(B, L, K, X)).astype(np.float32)
    pos = np.broadcast_to(np.arange(L), (B, L))
    out = np.asarray(causal_attention(q, k, v, pos, pos))
    ref = naive_attention(q, k, v)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_bf16_compute_close_to_f32(tiny_cfg):
    f32 = Transformer(tiny_cfg, nnx.Rngs(0))
    bf16 = Transformer(ModelConfig(**{**tiny_cfg.to_dict(), "dtype": "bfloat16"}), nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
    a, b = np.asarray(f32(tokens)), np.asarray(bf16(tokens))
    assert b.dtype == np.float32  # logits come back in float32
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max() + 0.05
    # the bf16 model really computes in bf16: its hidden states are bf16
    assert bf16.embed_tokens(tokens.reshape(-1)).dtype == jnp.bfloat16


def test_untied_head_and_params_carry_logical_axes(tiny_cfg):
    cfg = ModelConfig(**{**tiny_cfg.to_dict(), "tie_embeddings": False})
    model = Transformer(cfg, nnx.Rngs(0))
    _, state = nnx.split(model, nnx.Param)
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        axes = var.get_metadata().get("axes")
        assert axes is not None and len(axes) == var[...].ndim, path
    names = {"/".join(map(str, p)) for p, _ in flat}
    assert "lm_head" in names and "layers/0/attn/wq" in names


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"n_heads": 8, "n_kv_heads": 3}, "multiple of n_kv_heads"),
        ({"n_kv_heads": 16}, "multiple of n_kv_heads"),
        ({"d_model": 100, "n_heads": 3}, "not divisible"),
        ({"dtype": "float16"}, "is not one of"),
        ({"n_layers": 0}, "must be > 0"),
    ],
)
def test_config_rejects_bad_values(fields, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**fields)


def test_config_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="did you mean 'd_model'"):
        ModelConfig.from_dict({"d_modle": 64})


def test_config_is_frozen_and_round_trips(tiny_cfg):
    with pytest.raises(AttributeError):
        tiny_cfg.d_model = 3
    assert ModelConfig.from_dict(tiny_cfg.to_dict()) == tiny_cfg
    assert tiny_cfg.head_dim == 16 and tiny_cfg.q_per_kv == 2
