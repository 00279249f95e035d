"""Frozen, self-checking LoRA settings, nested in `ModelConfig.lora`.

Targets use the Hugging Face / PEFT module names, so an adapter's config reads
the same here and in `adapter_config.json`; "router" is the MoE router
(Mixtral's `block_sparse_moe.gate`).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

from models.errors import ConfigError, check_keys
from models.errors import require as _require

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TARGETS = (*ATTENTION_TARGETS, *MLP_TARGETS, "router")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters W + (alpha / rank) * A @ B on the `targets` of every layer.

    rank: r, the inner dimension of A [in, r] and B [r, out].
    alpha: the scale is alpha / rank (PEFT's default, not rsLoRA).
    targets: PEFT module names among TARGETS ("router": the MoE router), in any order.
    dropout: only 0 (LoRA dropout is not implemented; it does not change inference).
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0

    def __post_init__(self):
        targets = self.targets
        if isinstance(targets, str):  # "q_proj,v_proj" from a command line
            targets = tuple(t.strip() for t in targets.split(",") if t.strip())
        object.__setattr__(self, "targets", tuple(targets))
        _require(
            isinstance(self.rank, int) and self.rank > 0,
            f"model.lora.rank must be an integer > 0, got {self.rank!r}",
        )
        _require(self.alpha > 0, f"model.lora.alpha must be > 0, got {self.alpha}")
        _require(
            self.dropout == 0,
            f"model.lora.dropout must be 0 (LoRA dropout is not implemented), got {self.dropout}",
        )
        _require(bool(self.targets), f"model.lora.targets must name at least one of {TARGETS}")
        for t in self.targets:
            if t not in TARGETS:
                close = difflib.get_close_matches(str(t), TARGETS, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"unknown model.lora target '{t}'{hint}; targets are {TARGETS}")
        _require(
            len(set(self.targets)) == len(self.targets),
            f"model.lora.targets names a module twice: {self.targets}",
        )
        # one order (TARGETS'), so configs that name the same modules are equal
        object.__setattr__(self, "targets", tuple(sorted(self.targets, key=TARGETS.index)))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_any(cls, value: LoraConfig | Mapping[str, Any]) -> LoraConfig:
        if isinstance(value, LoraConfig):
            return value
        if not hasattr(value, "keys"):  # a dict or a ConfigDict
            raise ConfigError(f"model.lora must be None or a dict of LoRA settings, got {value!r}")
        d = dict(value)
        check_keys(cls, d, "model.lora config")
        return cls(**d)

    def check_model(self, n_layers: int, moe) -> None:
        """Every target must exist in the model: the router in an MoE layer, the MLP
        projections in a dense one (an MoE layer's experts take no adapter)."""
        moe_layers = [i for i in range(n_layers) if moe is not None and moe.is_moe_layer(i)]
        if "router" in self.targets and not moe_layers:
            raise ConfigError("model.lora target 'router' needs MoE layers, and model.moe is None")
        mlp = [t for t in self.targets if t in MLP_TARGETS]
        if mlp and len(moe_layers) == n_layers:
            raise ConfigError(
                f"model.lora targets {mlp} are dense-MLP projections, and every layer is MoE "
                "(adapters on experts are not supported); target 'router' or attention"
            )
