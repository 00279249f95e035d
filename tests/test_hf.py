"""Hugging Face Llama checkpoints: logits parity with transformers, export and its refusals,
bad folders."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from models import ConfigError, Transformer, hf  # noqa: E402


def _hf_llama(tmp_path, tie=False, kv_heads=2):
    cfg = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a norm mix-up would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    return model


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("tie, kv_heads", [(False, 2), (True, 4), (False, 8)])
def test_llama_logits_match_transformers(tmp_path, tie, kv_heads):
    ref_model = _hf_llama(tmp_path, tie=tie, kv_heads=kv_heads)
    ours = hf.load_llama(tmp_path)
    assert ours.cfg.n_kv_heads == kv_heads and ours.cfg.tie_embeddings == tie
    tokens = np.random.default_rng(0).integers(0, 300, (2, 40))
    np.testing.assert_allclose(
        np.asarray(ours(jnp.asarray(tokens))), _hf_logits(ref_model, tokens), atol=1e-4
    )


@pytest.mark.parametrize("tie, rope_theta", [(True, 10000.0), (False, 5000.0)])
def test_saved_llama_loads_in_transformers(tmp_path, tiny_cfg, tie, rope_theta):
    cfg = dataclasses.replace(tiny_cfg, tie_embeddings=tie, rope_theta=rope_theta, norm_eps=1e-6)
    model = Transformer(cfg, nnx.Rngs(3))
    hf.save_llama(model, tmp_path)
    theirs, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    tokens = np.random.default_rng(1).integers(0, 256, (2, 20))
    np.testing.assert_allclose(
        np.asarray(model(jnp.asarray(tokens))), _hf_logits(theirs.eval(), tokens), atol=1e-4
    )
    again = hf.load_llama(tmp_path)
    assert again.cfg == cfg


def _refused(save, cfg, tmp_path, message):
    """`save` raises a ConfigError matching `message` and leaves the target folder absent."""
    out = tmp_path / "exported"
    with pytest.raises(ConfigError, match=message):
        save(Transformer(cfg, nnx.Rngs(0)), out)
    assert not out.exists()


MIXTRAL_MOE = dict(num_experts=4, top_k=2, gates="topk_softmax", every=1, offset=0)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"moe": MIXTRAL_MOE}, r"Llama has dense MLPs only; save it with hf\.save_mixtral"),
        (
            {"moe": {**MIXTRAL_MOE, "router": "expert_choice", "gates": "softmax"}},
            "dense MLPs only; nor can Mixtral hold it: model.moe.router='expert_choice'",
        ),
        (
            {"attention": {"pattern": "strided,dense", "stride": 8, "summary": 2}},
            r"layers \[0\] use Sparse Transformer attention .*pattern='strided,dense'",
        ),
    ],
    ids=["moe", "moe-expert-choice", "sparse-attention"],
)
def test_save_llama_refuses_what_llama_cannot_hold(tmp_path, tiny_cfg, change, message):
    _refused(hf.save_llama, dataclasses.replace(tiny_cfg, **change), tmp_path, message)


def test_save_model_picks_the_format(tmp_path, tiny_cfg):
    moe_cfg = dataclasses.replace(tiny_cfg, moe={**MIXTRAL_MOE, "capacity_factor": 2.0})
    for cfg, model_type in [(tiny_cfg, "llama"), (moe_cfg, "mixtral")]:
        out = tmp_path / model_type
        hf.save_model(Transformer(cfg, nnx.Rngs(0)), out)
        assert hf.read_config(out)["model_type"] == model_type
        assert hf.load_model(out).cfg == cfg
    assert hf.export_problems(tiny_cfg, "llama") == []
    assert hf.export_problems(moe_cfg, "mixtral") == []


def test_not_a_model_folder(tmp_path):
    with pytest.raises(hf.HFFormatError, match="no config.json"):
        hf.load_llama(tmp_path)


def test_wrong_model_type_and_unsupported_features(tmp_path):
    _hf_llama(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for change, message in [
        ({"model_type": "gpt2"}, "not a Llama-family"),
        ({"hidden_act": "gelu"}, "only silu"),
        ({"attention_bias": True}, "biases"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1.0}}, "rope type"),
        ({"num_key_value_heads": 3}, "invalid model"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(hf.HFFormatError, match=message):
            hf.load_llama(tmp_path)


def test_missing_and_corrupt_tensors(tmp_path):
    _hf_llama(tmp_path)
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(hf.HFFormatError, match="lacks tensor 'model.layers.1.mlp.up_proj"):
        hf.load_llama(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(hf.HFFormatError, match="cannot read"):
        hf.load_llama(tmp_path)
