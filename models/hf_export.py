"""Hugging Face checkpoints written from our model: `save_llama` (dense models),
`save_mixtral` (every layer a top-k MoE with renormalised gates, dropless when served) or
`save_model` (whichever fits). A model a format cannot hold (sparse attention, MoE in
Llama, expert choice or some-layers MoE in Mixtral, ...) is refused with a ConfigError
before anything is written: `export_problems` lists why. `models.hf` re-exports these
beside the loaders.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import numpy as np
from flax import nnx

from models.config import ConfigError, ModelConfig
from models.transformer import Transformer

FORMATS = ("llama", "mixtral")


def export_problems(cfg: ModelConfig, fmt: str) -> list[str]:
    """Everything of `cfg` that Hugging Face `fmt` ("llama" or "mixtral") cannot hold; [] if none.

    Only what changes the served model counts: training-only MoE settings
    (capacity factors, jitter, z loss, second_policy, batch_priority, group
    size) are not part of either format and are simply not written.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format '{fmt}' is not one of {FORMATS}")
    problems = []
    if cfg.lora is not None:
        problems.append(
            "it has a LoRA adapter (model.lora is set), which a checkpoint does not hold: fold it "
            "in with lora.merge(model), or save lora.base_model(model) and the adapter apart "
            "(lora_peft.save_adapter)"
        )
    sparse = [i for i in range(cfg.n_layers) if cfg.attention.pattern_name(i) != "dense"]
    if sparse:
        problems.append(
            f"layers {sparse} use Sparse Transformer attention (model.attention.pattern="
            f"'{cfg.attention.pattern}'), which Hugging Face {fmt.title()} does not have: it "
            "would attend densely and compute other logits; only models whose every layer is "
            "'dense' can be exported"
        )
    if fmt == "llama" and cfg.moe is not None:
        mixtral = _mixtral_moe_problems(cfg)
        hint = "save it with hf.save_mixtral" if not mixtral else "nor can Mixtral hold it: "
        problems.append(
            "it is a Mixture-of-Experts model (model.moe is set) and Llama has dense MLPs only; "
            + hint
            + "; ".join(mixtral)
        )
    if fmt == "mixtral":
        if cfg.moe is None:
            problems.append("it has no MoE layers (model.moe is None); save it with hf.save_llama")
        else:
            problems += _mixtral_moe_problems(cfg)
    return problems


def _mixtral_moe_problems(cfg: ModelConfig) -> list[str]:
    """The MoE settings of `cfg` that Mixtral (top-k, renormalised, dropless, every layer) lacks."""
    moe, problems = cfg.moe, []
    if moe.router != "top_k":
        problems.append(
            f"model.moe.router='{moe.router}' lets experts choose their tokens; Mixtral's tokens "
            "choose their experts (router='top_k')"
        )
    elif moe.gates != "topk_softmax":
        problems.append(
            f"model.moe.gates='{moe.gates}' weights the chosen experts by their probability "
            "over all experts; Mixtral renormalises over the chosen ones (gates='topk_softmax')"
        )
    layers = [i for i in range(cfg.n_layers) if moe.is_moe_layer(i)]
    if len(layers) < cfg.n_layers:
        problems.append(
            f"model.moe.every={moe.every}, offset={moe.offset} makes only layers {layers} MoE; "
            "Mixtral has an MoE in every layer (every=1, offset=0)"
        )
    if moe.serve_capacity_factor is not None:
        problems.append(
            f"model.moe.serve_capacity_factor={moe.serve_capacity_factor} drops tokens past "
            "expert capacity when serving; Mixtral is dropless (serve_capacity_factor=None)"
        )
    return problems


def check_exportable(cfg: ModelConfig, fmt: str) -> None:
    """Raise a ConfigError listing everything Hugging Face `fmt` cannot hold of `cfg`."""
    problems = export_problems(cfg, fmt)
    if problems:
        raise ConfigError(
            f"cannot save this model as a Hugging Face {fmt.title()} checkpoint: "
            + "; ".join(problems)
        )


def _decoder_tensors(model: Transformer, mlp) -> dict[str, np.ndarray]:
    """HF tensors of embeddings, norms and attention; `mlp(subtree, prefix)` names each MLP's."""
    cfg = model.cfg
    D, H, K, X = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    _, state = nnx.split(model, nnx.Param)
    t = jax.tree.map(lambda a: np.asarray(a, np.float32), nnx.to_pure_dict(state))
    p = "model."
    out = {p + "embed_tokens.weight": t["embed"], p + "norm.weight": t["final_norm"]["scale"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = t["lm_head"].T
    for i, layer in t["layers"].items():
        q = f"{p}layers.{i}."
        a = layer["attn"]
        out[q + "input_layernorm.weight"] = layer["attn_norm"]["scale"]
        out[q + "post_attention_layernorm.weight"] = layer["mlp_norm"]["scale"]
        out[q + "self_attn.q_proj.weight"] = a["wq"].reshape(D, H * X).T
        out[q + "self_attn.k_proj.weight"] = a["wk"].reshape(D, K * X).T
        out[q + "self_attn.v_proj.weight"] = a["wv"].reshape(D, K * X).T
        out[q + "self_attn.o_proj.weight"] = a["wo"].reshape(H * X, D).T
        out.update(mlp(layer["mlp"], q))
    return out


def _decoder_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json fields Llama and Mixtral share (rope_theta twice: old and new transformers)."""
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.d_ff,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "hidden_act": "silu",
        "torch_dtype": "float32",  # tensors are written in float32 (exact for bfloat16 params)
    }


def _write(path: str | pathlib.Path, tensors: dict[str, np.ndarray], config: dict) -> None:
    from safetensors.numpy import save_file

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config, indent=2))


def save_llama(model: Transformer, path: str | pathlib.Path) -> None:
    """Write a dense model as a Hugging Face Llama folder (config.json + model.safetensors).

    Raises a ConfigError, writing nothing, for a model Llama cannot hold (see export_problems).
    """
    cfg = model.cfg
    check_exportable(cfg, "llama")
    mlp = lambda m, q: {
        q + "mlp.gate_proj.weight": m["w_gate"].T,
        q + "mlp.up_proj.weight": m["w_up"].T,
        q + "mlp.down_proj.weight": m["w_down"].T,
    }
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **_decoder_config(cfg),
        "attention_bias": False,
        "mlp_bias": False,
    }
    _write(path, _decoder_tensors(model, mlp), config)


def save_mixtral(model: Transformer, path: str | pathlib.Path) -> None:
    """Write an MoE model as a Hugging Face Mixtral folder, per-expert layout (as transformers).

    Raises a ConfigError, writing nothing, for a model Mixtral cannot hold (see export_problems).
    """
    cfg = model.cfg
    check_exportable(cfg, "mixtral")

    def mlp(m, q):
        b = q + "block_sparse_moe."
        out = {b + "gate.weight": m["router"].T}
        for e in range(cfg.moe.num_experts):
            out[f"{b}experts.{e}.w1.weight"] = m["w_gate"][e].T
            out[f"{b}experts.{e}.w3.weight"] = m["w_up"][e].T
            out[f"{b}experts.{e}.w2.weight"] = m["w_down"][e].T
        return out

    config = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        **_decoder_config(cfg),
        "num_local_experts": cfg.moe.num_experts,
        "num_experts_per_tok": cfg.moe.top_k,
        "router_aux_loss_coef": cfg.moe.aux_loss_coef,
        "router_jitter_noise": 0.0,  # ours jitters only the router input, so it is not the same
        "output_router_logits": False,
        "sliding_window": None,
        "attention_dropout": 0.0,
    }
    _write(path, _decoder_tensors(model, mlp), config)


def save_model(model: Transformer, path: str | pathlib.Path) -> None:
    """Write a model in the Hugging Face format that holds it: Llama if dense, Mixtral if MoE."""
    (save_llama if model.cfg.moe is None else save_mixtral)(model, path)
