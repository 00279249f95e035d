"""The engine serves every model family: MoE (dropless), Hugging Face Mixtral, sparse attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tests_serve_common import SERVE

from mlx_sched.serve.engine import Engine
from mlx_sched.serve.request import SamplingParams
from models import ModelConfig, Transformer
from models import generate as reference


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(0, 256, int(k)))) for k in rng.integers(2, 30, n)]


@pytest.mark.parametrize(
    "moe",
    [
        pytest.param(dict(num_experts=4, top_k=1, every=2, offset=1), id="switch"),
        pytest.param(
            dict(num_experts=4, top_k=2, gates="topk_softmax", every=1, offset=0),
            id="gshard_top2",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            dict(num_experts=4, router="expert_choice", causal_fallback="top_k", every=2),
            id="expert_choice_fallback",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_moe_engine_is_dropless_and_matches_full_recompute(moe):
    cfg = ModelConfig.from_dict(
        dict(
            vocab_size=264,
            d_model=32,
            n_layers=2,
            n_heads=2,
            n_kv_heads=1,
            d_ff=64,
            max_seq_len=96,
            moe=moe,
        )
    )
    model = Transformer(cfg, nnx.Rngs(0))
    prompts = _prompts(6)
    outs = Engine(model, SERVE).generate(prompts, SamplingParams(max_tokens=8))
    assert [o.outputs[0] for o in outs] == reference.generate(model, prompts, 8)


@pytest.mark.slow  # a Hugging Face checkpoint through the engine
def test_serves_a_hugging_face_mixtral(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from models import hf

    cfg = transformers.MixtralConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=96,
    )
    torch.manual_seed(0)
    theirs = transformers.MixtralForCausalLM(cfg).eval()
    theirs.save_pretrained(tmp_path)
    prompts = _prompts(3, seed=1)
    outs = Engine(hf.load_model(tmp_path), SERVE).generate(prompts, SamplingParams(max_tokens=6))
    for p, o in zip(prompts, outs, strict=True):
        ids = torch.tensor([p])
        with torch.no_grad():
            g = theirs.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=6,
                do_sample=False,
                pad_token_id=299,
                eos_token_id=None,
            )
        assert o.outputs[0] == g[0, len(p) :].tolist()


_SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "pattern, heads",
    [
        ("strided,dense", "interleave"),
        ("fixed", "union"),
        pytest.param("strided", "interleave", marks=_SLOW),
        pytest.param("fixed", "interleave", marks=_SLOW),
        pytest.param("strided", "union", marks=_SLOW),
        pytest.param("strided,dense", "union", marks=_SLOW),
    ],
)
def test_sparse_attention_engine_matches_full_recompute(pattern, heads):
    """Sparse layers: prefill masks the paged context; decode reads only the needed keys."""
    cfg = ModelConfig.from_dict(
        dict(
            vocab_size=264,
            d_model=32,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            d_ff=64,
            max_seq_len=96,
            attention=dict(pattern=pattern, stride=8, summary=2, heads=heads),
        )
    )
    model = Transformer(cfg, nnx.Rngs(1))
    prompts = _prompts(5, seed=2)
    outs = Engine(model, SERVE).generate(prompts, SamplingParams(max_tokens=10))
    assert [o.outputs[0] for o in outs] == reference.generate(model, prompts, 10)


def test_sparse_decode_reads_fewer_keys_than_the_context():
    from models.sparse_attention import make_pattern

    strided = make_pattern("strided", 8, 2, "union", 4)
    assert strided.num_needed(96) < 96 // 2  # per query: ~l + n / l keys, not n


def test_packed_bf16_embedding_gather_equals_the_model_s():
    from mlx_sched.serve import steps

    cfg = ModelConfig(vocab_size=264, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64)
    model = Transformer(cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    bf16 = nnx.merge(graphdef, params)
    tables = steps.pack_table(bf16.embed[...])
    assert tables["embed_words"].dtype == jnp.uint32
    tokens = jnp.asarray([0, 5, 263, 5])
    got = steps.embed(bf16, tables, tokens)
    np.testing.assert_array_equal(
        np.asarray(got, np.float32), np.asarray(bf16.embed[...][tokens], np.float32)
    )
    assert steps.pack_table(model.embed[...]) == {}  # float32: the plain gather


def test_bfloat16_engine_matches_bfloat16_full_recompute():
    cfg = ModelConfig(
        vocab_size=264, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
        max_seq_len=128, dtype="bfloat16", init_std=0.3,
    )  # fmt: skip
    model = Transformer(cfg, nnx.Rngs(2))
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(0, 256, n))) for n in (5, 19, 33)]
    want = reference.generate(model, prompts, 6)
    engine = Engine(model, SERVE)
    outs = engine.generate(prompts, SamplingParams(max_tokens=6))
    assert [o.outputs[0] for o in outs] == want
