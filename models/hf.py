"""Hugging Face checkpoints (config.json + safetensors) to and from our model.

Supported: Llama-family decoders (model_type llama / mistral without sliding
window) and Mixtral (the same decoder with every MLP a top-2 MoE whose gates
are a softmax over the chosen logits). HF linear weights are [out, in]; ours
are [in, ...out] with heads as their own axis, so loading is a transpose and
a reshape. Rotary embeddings use the same half-split layout, so no
permutation is needed.

Export is the reverse (`models/hf_export.py`, re-exported here): `save_llama`,
`save_mixtral` or `save_model`, refusing with a ConfigError what a format cannot hold.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ConfigError, ModelConfig
from models.hf_export import (  # noqa: F401  (re-exported: models.hf reads and writes)
    FORMATS,
    check_exportable,
    export_problems,
    save_llama,
    save_mixtral,
    save_model,
)
from models.transformer import Transformer


class HFFormatError(ValueError):
    """The folder is not a loadable Hugging Face checkpoint; the message says why."""


LLAMA_TYPES = ("llama", "mistral")


def read_config(path: str | pathlib.Path) -> dict[str, Any]:
    path = pathlib.Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise HFFormatError(f"'{path}' has no config.json; expected a Hugging Face model folder")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise HFFormatError(f"{cfg_file} is not valid JSON: {e}") from e


def llama_model_config(hf: dict[str, Any], **overrides) -> ModelConfig:
    """Our ModelConfig from a Llama-family config.json dict."""
    mtype = hf.get("model_type")
    if mtype not in LLAMA_TYPES:
        raise HFFormatError(f"model_type '{mtype}' is not a Llama-family model {LLAMA_TYPES}")
    if hf.get("hidden_act", "silu") != "silu":
        raise HFFormatError(f"hidden_act '{hf['hidden_act']}' unsupported (only silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise HFFormatError("attention or MLP biases are not supported")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise HFFormatError(f"rope type '{rope['rope_type']}' is not supported (only default)")
    if hf.get("rope_scaling"):
        raise HFFormatError(f"rope_scaling {hf['rope_scaling']} is not supported")
    if mtype == "mistral" and hf.get("sliding_window"):
        raise HFFormatError("Mistral sliding-window attention is not supported")
    n_heads = hf["num_attention_heads"]
    fields = dict(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range") or 0.02),
    )
    fields.update(overrides)
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise HFFormatError(f"config.json gives an invalid model: {e}") from e


def read_safetensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """All tensors of a model folder (single file or sharded with an index), as float32 numpy."""
    from safetensors import safe_open

    path = pathlib.Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise HFFormatError(f"'{path}' has no *.safetensors files")
    out = {}
    for f in files:
        try:
            with safe_open(str(f), framework="flax") as st:
                for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                    out[name] = np.asarray(st.get_tensor(name).astype(jnp.float32))
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise HFFormatError(f"cannot read {f}: {e}") from e
    return out


def _get(tensors: dict[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in tensors:
        raise HFFormatError(f"checkpoint lacks tensor '{name}'")
    t = tensors[name]
    if t.shape != shape:
        raise HFFormatError(f"tensor '{name}' has shape {t.shape}, expected {shape}")
    return t


def llama_params(cfg: ModelConfig, tensors: dict[str, np.ndarray], mlp=None) -> dict[str, Any]:
    """Our parameter tree (pure dict) from HF Llama tensors.

    `mlp(tensors, prefix)` builds one layer's MLP subtree (default: dense SwiGLU).
    """
    D, H, K, X, F, V = (
        cfg.d_model,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim,
        cfg.d_ff,
        cfg.vocab_size,
    )
    p = "model."
    if mlp is None:
        mlp = lambda t, q: {
            "w_gate": _get(t, q + "mlp.gate_proj.weight", (F, D)).T,
            "w_up": _get(t, q + "mlp.up_proj.weight", (F, D)).T,
            "w_down": _get(t, q + "mlp.down_proj.weight", (D, F)).T,
        }
    tree: dict[str, Any] = {
        "embed": _get(tensors, p + "embed_tokens.weight", (V, D)),
        "final_norm": {"scale": _get(tensors, p + "norm.weight", (D,))},
        "layers": {},
    }
    if not cfg.tie_embeddings:
        tree["lm_head"] = _get(tensors, "lm_head.weight", (V, D)).T
    for i in range(cfg.n_layers):
        q = f"{p}layers.{i}."
        lin = lambda n, shape, q=q: _get(tensors, q + n + ".weight", shape).T
        tree["layers"][i] = {
            "attn_norm": {"scale": _get(tensors, q + "input_layernorm.weight", (D,))},
            "mlp_norm": {"scale": _get(tensors, q + "post_attention_layernorm.weight", (D,))},
            "attn": {
                "wq": lin("self_attn.q_proj", (H * X, D)).reshape(D, H, X),
                "wk": lin("self_attn.k_proj", (K * X, D)).reshape(D, K, X),
                "wv": lin("self_attn.v_proj", (K * X, D)).reshape(D, K, X),
                "wo": lin("self_attn.o_proj", (D, H * X)).reshape(H, X, D),
            },
            "mlp": mlp(tensors, q),
        }
    return tree


def load_into(model: nnx.Module, tree: dict[str, Any]) -> nnx.Module:
    """Replace a model's parameters with a pure-dict tree of the same structure."""
    graphdef, state = nnx.split(model, nnx.Param)
    wdt = model.cfg.weight_dtype
    cast = jax.tree.map(lambda a: jnp.asarray(a, wdt), tree)
    try:
        nnx.replace_by_pure_dict(state, cast)
    except (KeyError, ValueError) as e:
        raise HFFormatError(f"parameter tree does not match the model: {e}") from e
    return nnx.merge(graphdef, state)


def load_llama(path: str | pathlib.Path, **overrides) -> Transformer:
    """A Transformer holding the weights of a Llama-family HF checkpoint folder."""
    cfg = llama_model_config(read_config(path), **overrides)
    tree = llama_params(cfg, read_safetensors(path))
    model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    return load_into(model, tree)


def mixtral_model_config(hf: dict[str, Any], **overrides) -> ModelConfig:
    """Our ModelConfig from a Mixtral config.json dict: a Mistral decoder with MoE MLPs.

    Mixtral is dropless; training capacity defaults to num_experts / top_k
    (C = group size: nothing dropped); `moe={...}` overrides MoE fields.
    """
    if hf.get("model_type") != "mixtral":
        raise HFFormatError(f"model_type '{hf.get('model_type')}' is not 'mixtral'")
    E, k = hf["num_local_experts"], hf["num_experts_per_tok"]
    moe = dict(
        num_experts=E,
        top_k=k,
        gates="topk_softmax",
        capacity_factor=E / k,
        aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0),
        every=1,
        offset=0,
    )
    moe.update(overrides.pop("moe", {}))
    return llama_model_config({**hf, "model_type": "mistral"}, moe=moe, **overrides)


def mixtral_mlp(cfg: ModelConfig, tensors: dict[str, np.ndarray], q: str) -> dict[str, Any]:
    """One layer's MoE subtree from Mixtral tensors, per-expert (w1/w3/w2) or fused layout."""
    E, D, F = cfg.moe.num_experts, cfg.d_model, cfg.d_ff
    if q + "block_sparse_moe.gate.weight" in tensors:  # the layout of published checkpoints
        b = q + "block_sparse_moe."
        stack = lambda w, shape: np.stack(
            [_get(tensors, f"{b}experts.{e}.{w}.weight", shape).T for e in range(E)]
        )
        return {
            "router": _get(tensors, b + "gate.weight", (E, D)).T,
            "w_gate": stack("w1", (F, D)),
            "w_up": stack("w3", (F, D)),
            "w_down": stack("w2", (D, F)),
        }
    b = q + "mlp."  # transformers >= 5 in memory: gate and up fused per expert
    gate_up = _get(tensors, b + "experts.gate_up_proj", (E, 2 * F, D))
    return {
        "router": _get(tensors, b + "gate.weight", (E, D)).T,
        "w_gate": gate_up[:, :F].transpose(0, 2, 1),
        "w_up": gate_up[:, F:].transpose(0, 2, 1),
        "w_down": _get(tensors, b + "experts.down_proj", (E, D, F)).transpose(0, 2, 1),
    }


def load_mixtral(path: str | pathlib.Path, **overrides) -> Transformer:
    """A Transformer holding the weights of a Mixtral HF checkpoint folder."""
    cfg = mixtral_model_config(read_config(path), **overrides)
    mlp = lambda t, q: mixtral_mlp(cfg, t, q)
    tree = llama_params(cfg, read_safetensors(path), mlp=mlp)
    model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    return load_into(model, tree)


# -- export: refuse what a format cannot hold, then write it ------------------


def load_model(path: str | pathlib.Path, **overrides):
    """Load any supported Hugging Face decoder folder, dispatching on config.json's model_type."""
    mtype = read_config(path).get("model_type")
    if mtype in LLAMA_TYPES:
        return load_llama(path, **overrides)
    if mtype == "mixtral":
        return load_mixtral(path, **overrides)
    raise HFFormatError(
        f"model_type '{mtype}' is not supported (supported: {(*LLAMA_TYPES, 'mixtral')})"
    )
