"""Hugging Face Mixtral checkpoints: logits parity with transformers, both weight layouts,
export (round trip through transformers) and its refusals."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from models import ConfigError, ModelConfig, Transformer, hf  # noqa: E402


def _hf_mixtral(tmp_path, experts=4, top_k=2):
    cfg = transformers.MixtralConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=128,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
        initializer_range=0.1,  # router logits far enough apart that routing matters
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    return model


@nnx.jit(static_argnames="mode")
def _logits(model, tokens, mode="serve"):
    return model(jnp.asarray(tokens), mode=mode)


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("experts, top_k", [(4, 2), (8, 1)])
def test_mixtral_logits_match_transformers(tmp_path, experts, top_k):
    ref_model = _hf_mixtral(tmp_path, experts, top_k)
    ours = hf.load_mixtral(tmp_path)
    moe = ours.cfg.moe
    assert (moe.num_experts, moe.top_k, moe.gates) == (experts, top_k, "topk_softmax")
    assert all(moe.is_moe_layer(i) for i in range(2))
    tokens = np.random.default_rng(0).integers(0, 300, (2, 40))
    ref = _hf_logits(ref_model, tokens)
    np.testing.assert_allclose(np.asarray(_logits(ours, tokens)), ref, atol=1e-4)
    # training routing with capacity E / k drops nothing, so it agrees too
    np.testing.assert_allclose(np.asarray(_logits(ours, tokens, "eval")), ref, atol=1e-4)


def test_mixtral_fused_expert_layout_loads_the_same(tmp_path):
    """transformers >= 5 keeps gate and up fused per expert ([E, 2F, D]); load that too."""
    from safetensors.numpy import load_file, save_file

    ref_model = _hf_mixtral(tmp_path)
    w = load_file(str(tmp_path / "model.safetensors"))
    for i in range(2):
        old = f"model.layers.{i}.block_sparse_moe."
        new = f"model.layers.{i}.mlp."
        per = lambda n, old=old: np.stack([w.pop(f"{old}experts.{e}.{n}.weight") for e in range(4)])
        w1, w3, w2 = per("w1"), per("w3"), per("w2")
        w[new + "experts.gate_up_proj"] = np.concatenate([w1, w3], axis=1)
        w[new + "experts.down_proj"] = w2
        w[new + "gate.weight"] = w.pop(old + "gate.weight")
    save_file(w, str(tmp_path / "model.safetensors"))
    tokens = np.random.default_rng(1).integers(0, 300, (1, 24))
    out = np.asarray(_logits(hf.load_mixtral(tmp_path), tokens))
    np.testing.assert_allclose(out, _hf_logits(ref_model, tokens), atol=1e-4)


def test_mixtral_bad_folders(tmp_path):
    _hf_mixtral(tmp_path)
    with pytest.raises(hf.HFFormatError, match="not a Llama-family"):
        hf.load_llama(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_experts_per_tok": 5}))
    with pytest.raises(hf.HFFormatError, match="top_k=5 must be in"):
        hf.load_mixtral(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(hf.HFFormatError, match="is not 'mixtral'"):
        hf.load_mixtral(tmp_path)
    from safetensors.numpy import load_file, save_file

    (tmp_path / "config.json").write_text(json.dumps(cfg))
    w = load_file(str(tmp_path / "model.safetensors"))
    del w["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(w, str(tmp_path / "model.safetensors"))
    with pytest.raises(hf.HFFormatError, match="lacks tensor 'model.layers.1.block_sparse_moe"):
        hf.load_mixtral(tmp_path)


def _moe_cfg(tie=False, **moe) -> ModelConfig:
    """A tiny model Mixtral holds: every layer top-2 of 4 with renormalised gates.

    capacity_factor E / k is what load_mixtral sets (Mixtral is dropless), so the
    config survives the round trip; init_std 0.1 keeps router logits apart.
    """
    moe = dict(num_experts=4, top_k=2, gates="topk_softmax", every=1, offset=0) | moe
    return ModelConfig(
        vocab_size=264,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=48,
        max_seq_len=128,
        rope_theta=5000.0,
        norm_eps=1e-6,
        tie_embeddings=tie,
        init_std=0.1,
        moe={"capacity_factor": moe["num_experts"] / moe["top_k"], **moe},
    )


def _params(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _with_random_norms(model, seed=0):
    """Norm scales away from 1, so that a norm mix-up in the export would show."""
    rng = np.random.default_rng(seed)
    tree = jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.1 * rng.standard_normal(a.shape) if "scale" in str(path) else a,
        _params(model),
    )
    return hf.load_into(model, tree)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_saved_mixtral_matches_transformers_and_loads_back(tmp_path, tie):
    cfg = _moe_cfg(tie)
    model = _with_random_norms(Transformer(cfg, nnx.Rngs(5)))
    hf.save_mixtral(model, tmp_path)
    theirs, info = transformers.MixtralForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    tokens = np.random.default_rng(2).integers(0, 264, (2, 32))
    ours = np.asarray(_logits(model, tokens))
    np.testing.assert_allclose(ours, _hf_logits(theirs.eval(), tokens), atol=1e-4)

    again = hf.load_mixtral(tmp_path)
    assert again.cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, _params(again), _params(model))
    np.testing.assert_array_equal(np.asarray(_logits(again, tokens)), ours)


@pytest.mark.parametrize(
    "cfg, message",
    [
        (
            dataclasses.replace(_moe_cfg(), moe=None),
            r"no MoE layers \(model.moe is None\); save it with hf\.save_llama",
        ),
        (
            _moe_cfg(router="expert_choice", gates="softmax", top_k=1),
            "model.moe.router='expert_choice' lets experts choose their tokens",
        ),
        (_moe_cfg(gates="softmax"), r"gates='softmax'.*Mixtral renormalises"),
        (
            _moe_cfg(every=2, offset=1),
            r"every=2, offset=1 makes only layers \[1\] MoE; Mixtral has an MoE in every layer",
        ),
        (_moe_cfg(serve_capacity_factor=1.0), "serve_capacity_factor=1.0 drops tokens"),
        (
            dataclasses.replace(
                _moe_cfg(), attention={"pattern": "dense,fixed", "stride": 8, "summary": 2}
            ),
            r"layers \[1\] use Sparse Transformer attention",
        ),
        (  # every problem is named, not just the first
            _moe_cfg(router="expert_choice", gates="softmax", top_k=1, every=2, offset=0),
            "router='expert_choice'.*; model.moe.every=2, offset=0 makes only layers",
        ),
    ],
    ids=[
        "dense",
        "expert-choice",
        "softmax-gates",
        "every-other-layer",
        "serve-capacity",
        "sparse-attention",
        "several",
    ],
)
def test_save_mixtral_refuses_what_mixtral_cannot_hold(tmp_path, cfg, message):
    out = tmp_path / "exported"
    with pytest.raises(ConfigError, match=message):
        hf.save_mixtral(Transformer(cfg, nnx.Rngs(0)), out)
    assert not out.exists()
