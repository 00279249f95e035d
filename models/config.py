"""Frozen, self-checking model configuration.

A loose `ml_collections.ConfigDict` becomes a `ModelConfig` the moment it
enters `models/`; every field is checked in `__post_init__` so that a bad
value fails at config time with a one-line message, not deep in a trace.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from models.attention_config import AttentionConfig
from models.errors import ConfigError, check_keys
from models.errors import require as _require
from models.lora_config import LoraConfig
from models.moe_config import MoEConfig

__all__ = ["DTYPES", "ConfigError", "ModelConfig", "check_keys"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only Transformer (Llama family: RMSNorm, RoPE, GQA, SwiGLU)."""

    vocab_size: int = 264
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    head_dim: int = 0  # 0: d_model // n_heads
    d_ff: int = 768
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dtype: str = "float32"  # compute dtype; matmuls accumulate in float32
    param_dtype: str = "float32"
    init_std: float = 0.02
    moe: MoEConfig | None = None  # Mixture-of-Experts layers; a nested dict is converted
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    lora: LoraConfig | None = None  # low-rank adapters (models/lora.py); a nested dict is converted

    def __post_init__(self):
        if self.head_dim == 0:
            _require(
                self.n_heads > 0 and self.d_model % self.n_heads == 0,
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "set head_dim explicitly",
            )
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
            _require(
                getattr(self, name) > 0, f"model.{name} must be > 0, got {getattr(self, name)}"
            )
        _require(self.head_dim > 0, f"model.head_dim must be > 0, got {self.head_dim}")
        _require(
            self.n_kv_heads <= self.n_heads and self.n_heads % self.n_kv_heads == 0,
            f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}",
        )
        _require(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for RoPE")
        _require(self.max_seq_len > 0, f"max_seq_len must be > 0, got {self.max_seq_len}")
        for name in ("dtype", "param_dtype"):
            _require(
                getattr(self, name) in DTYPES,
                f"model.{name}='{getattr(self, name)}' is not one of {sorted(DTYPES)}",
            )
        self._init_moe()
        object.__setattr__(self, "attention", AttentionConfig.from_any(self.attention))
        self.attention.check_model(self.n_layers, self.n_heads)
        if self.lora is not None:
            object.__setattr__(self, "lora", LoraConfig.from_any(self.lora))
            self.lora.check_model(self.n_layers, self.moe)

    def _init_moe(self):
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            object.__setattr__(self, "moe", MoEConfig.from_dict(self.moe))
        _require(
            self.moe is None or any(map(self.moe.is_moe_layer, range(self.n_layers))),
            "model.moe.every/offset select none of the model's layers",
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        d = dict(d)
        check_keys(cls, d, "model config")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json_dict(self) -> dict[str, Any]:
        """to_dict() as it reads back from JSON (tuples become lists), for comparisons."""
        return json.loads(json.dumps(self.to_dict()))

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads
