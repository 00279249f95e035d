"""LoRA adapters in the Hugging Face PEFT layout: `adapter_config.json` +
`adapter_model.safetensors`, read and written by `peft` (PeftModel.from_pretrained /
save_pretrained) for the Llama and Mixtral checkpoints of `models/hf.py`.

PEFT stores a Linear's adapter as `lora_A.weight` [r, in] and `lora_B.weight` [out, r]
under the module's name, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A
.weight`; ours are A [in dims..., I] and B [I, out dims...] with heads as their own axes,
so reading is a transpose and a reshape, as for the base weights. The router's adapter is
named after Mixtral's router, `block_sparse_moe.gate` (target "gate"; `mlp.gate`, the
name in transformers >= 5, is read too).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax.numpy as jnp
import numpy as np

from models import lora
from models.config import ConfigError
from models.hf import HFFormatError
from models.lora_config import ATTENTION_TARGETS, MLP_TARGETS

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model.model.layers."

# our target -> (PEFT target_modules name, module path in a decoder layer, other paths read)
HF_MODULES = {
    **{t: (t, f"self_attn.{t}", ()) for t in ATTENTION_TARGETS},
    **{t: (t, f"mlp.{t}", ()) for t in MLP_TARGETS},
    "router": ("gate", "block_sparse_moe.gate", ("mlp.gate",)),
}
FROM_HF = {hf_name: ours for ours, (hf_name, _, _) in HF_MODULES.items()}

# adapter_config.json options whose non-default values change the adapter: refused
UNSUPPORTED = {
    "use_dora": False,
    "use_rslora": False,
    "fan_in_fan_out": False,
    "bias": "none",
    "lora_bias": False,
    "modules_to_save": None,
    "layers_to_transform": None,
    "layer_replication": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "target_parameters": None,
    "trainable_token_indices": None,
}


class AdapterFormatError(HFFormatError):
    """The folder is not a loadable PEFT LoRA adapter for this model; the message says why."""


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def adapter_tensors(model) -> dict[str, np.ndarray]:
    """PEFT-named float32 tensors of every adapter of `model`."""
    out = {}
    for layer, target, _, ad in lora.adapters(model):
        name = f"{PREFIX}{layer}.{HF_MODULES[target][1]}"
        a = np.asarray(ad.a[...], np.float32)
        b = np.asarray(ad.b[...], np.float32)
        rank = a.shape[-1]
        out[name + ".lora_A.weight"] = a.reshape(-1, rank).T
        out[name + ".lora_B.weight"] = b.reshape(rank, -1).T
    return out


def adapter_config(lcfg: lora.LoraConfig, base_model_name_or_path: str | None = None) -> dict:
    """The adapter_config.json of `lcfg`, as PEFT writes it for a causal LM."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lcfg.rank,
        "lora_alpha": lcfg.alpha,
        "target_modules": sorted(HF_MODULES[t][0] for t in lcfg.targets),
        "lora_dropout": lcfg.dropout,
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
        "layers_pattern": None,
        **UNSUPPORTED,
    }


def save_adapter(model, path: str | pathlib.Path, base_model_name_or_path: str | None = None):
    """Write `model`'s adapter as a PEFT folder: adapter_config.json, adapter_model.safetensors."""
    from safetensors.numpy import save_file

    if model.cfg.lora is None:
        raise ConfigError("the model has no adapter to save (model.cfg.lora is None)")
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in adapter_tensors(model).items()}
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    config = adapter_config(model.cfg.lora, base_model_name_or_path)
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


def read_adapter_config(path: str | pathlib.Path) -> lora.LoraConfig:
    """Our LoraConfig from a PEFT adapter folder's adapter_config.json, refusing what it
    cannot hold (DoRA, rsLoRA, biases, per-layer ranks, regex targets, ...)."""
    f = pathlib.Path(path) / CONFIG_FILE
    if not f.is_file():
        raise AdapterFormatError(f"'{path}' has no {CONFIG_FILE}; expected a PEFT adapter folder")
    try:
        hf: dict[str, Any] = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"{f} is not valid JSON: {e}") from e
    if hf.get("peft_type") != "LORA":
        raise AdapterFormatError(f"{f}: peft_type {hf.get('peft_type')!r} is not 'LORA'")
    for key, default in UNSUPPORTED.items():
        if hf.get(key, default) not in (default, None, {}, [], False):
            raise AdapterFormatError(f"{f}: {key}={hf[key]!r} is not supported (only {default!r})")
    targets = hf.get("target_modules")
    if not isinstance(targets, list):
        raise AdapterFormatError(
            f"{f}: target_modules must be a list of module names, got {targets!r} "
            f"(regular expressions and 'all-linear' are not supported)"
        )
    unknown = [t for t in targets if t not in FROM_HF]
    if unknown:
        raise AdapterFormatError(
            f"{f}: target_modules {unknown} are not supported (supported: {sorted(FROM_HF)})"
        )
    try:  # dropout only matters in training: an adapter trained with it loads for inference
        return lora.LoraConfig(
            rank=hf.get("r"), alpha=hf.get("lora_alpha"), targets=[FROM_HF[t] for t in targets]
        )
    except (ConfigError, TypeError) as e:
        raise AdapterFormatError(f"{f}: {e}") from e


def _read_tensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    f = path / WEIGHTS_FILE
    if not f.is_file():
        raise AdapterFormatError(f"'{path}' has no {WEIGHTS_FILE}")
    try:
        with safe_open(str(f), framework="flax") as st:
            return {
                k: np.asarray(st.get_tensor(k).astype(jnp.float32))
                for k in st.keys()  # noqa: SIM118 (safe_open is not a dict)
            }
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise AdapterFormatError(f"cannot read {f}: {e}") from e


def load_adapter(model, path: str | pathlib.Path):
    """`model` (a Transformer without adapters) with the PEFT adapter of folder `path`: a new
    model sharing the base weights. Every tensor must be there, with the base's shapes."""
    path = pathlib.Path(path)
    lcfg = read_adapter_config(path)
    tensors = _read_tensors(path)
    try:
        out = lora.add_adapter(model, lcfg)
    except ConfigError as e:
        raise AdapterFormatError(f"adapter '{path}' does not fit the model: {e}") from e
    unused = set(tensors)
    for layer, target, _, ad in lora.adapters(out):
        _, module, others = HF_MODULES[target]
        names = [f"{PREFIX}{layer}.{m}" for m in (module, *others)]
        name = next((n for n in names if n + ".lora_A.weight" in tensors), names[0])
        rank = lcfg.rank
        a_shape = (rank, int(np.prod(ad.a.shape[:-1])))
        b_shape = (int(np.prod(ad.b.shape[1:])), rank)
        a = _take(tensors, name + ".lora_A.weight", a_shape, unused)
        b = _take(tensors, name + ".lora_B.weight", b_shape, unused)
        ad.a[...] = jnp.asarray(a.T.reshape(ad.a.shape), ad.a.dtype)
        ad.b[...] = jnp.asarray(b.T.reshape(ad.b.shape), ad.b.dtype)
    if unused:
        raise AdapterFormatError(
            f"{path / WEIGHTS_FILE} has {len(unused)} tensors the model has no adapter for, "
            f"e.g. '{sorted(unused)[0]}' (another base model, or targets its config omits?)"
        )
    return out


def _take(tensors, name: str, shape: tuple[int, ...], unused: set) -> np.ndarray:
    if name not in tensors:
        raise AdapterFormatError(f"adapter lacks tensor '{name}'")
    t = tensors[name]
    if t.shape != shape:
        raise AdapterFormatError(
            f"adapter tensor '{name}' has shape {t.shape}, expected {shape} for this base model"
        )
    unused.discard(name)
    return t


__all__ = [
    "AdapterFormatError",
    "adapter_config",
    "adapter_tensors",
    "load_adapter",
    "read_adapter_config",
    "save_adapter",
]
