"""Frozen, self-checking Mixture-of-Experts settings, nested in `ModelConfig.moe`.

Capacity (expert slots per routing group of S tokens, E experts, k experts
per token) is `C = min(S, max(min_capacity, ceil(cf * k * S / E)))` for
tokens-choose routers and `ceil(cf * S / E)` (same clamps) for expert choice,
so cf = 1 means "exactly enough slots for perfectly balanced routing" and the
expert FLOPs of a layer scale with cf * k.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from models.errors import ConfigError, check_keys
from models.errors import require as _require

ROUTERS = ("top_k", "expert_choice")
GATES = ("softmax", "topk_softmax")
SECOND_POLICIES = ("all", "random")
FALLBACKS = ("top_k", "none")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Which layers are MoE, how tokens are routed, and the router's losses.

    router: "top_k" (tokens choose; top_k=1 is Switch, top_k=2 GShard) or
        "expert_choice" (each expert picks its C tokens of a group).
    gates: combine weights of the chosen experts: "softmax" (the router
        probability over all E experts, Switch / V-MoE / expert choice) or
        "topk_softmax" (softmax over the chosen logits, i.e. renormalised to
        sum 1: GShard top-2, Mixtral).
    second_policy: top-2 only; "random" keeps the second expert with
        probability min(1, 2 * g2) (GShard), "all" always keeps it.
    capacity_factor: training capacity; eval_capacity_factor (None: the same)
        is used in "eval" mode; serve_capacity_factor None means dropless
        serving (the default), a number means capacity-limited serving (the
        V-MoE compute-budget knob, best with batch_priority).
    batch_priority: fill capacity in order of router confidence (V-MoE BPR)
        instead of token order, in every capacity-limited mode.
    group_size: tokens per routing group; 0 means one group per sequence.
    every, offset: layer i is an MoE layer when i % every == offset.
    causal_fallback: expert choice sees a whole group (future tokens too), so
        an EC model is served with this causal router ("top_k" with top_k
        experts per token); "none" makes serving it an error.
    """

    num_experts: int = 8
    router: str = "top_k"
    top_k: int = 1
    gates: str = "softmax"
    second_policy: str = "all"
    capacity_factor: float = 1.25
    eval_capacity_factor: float | None = None
    serve_capacity_factor: float | None = None
    min_capacity: int = 4
    batch_priority: bool = False
    group_size: int = 0
    jitter: float = 0.0
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 1e-3
    every: int = 2
    offset: int = 1
    causal_fallback: str = "top_k"

    def __post_init__(self):
        E, k = self.num_experts, self.top_k
        _require(E > 0, f"model.moe.num_experts must be > 0, got {E}")
        _require(self.router in ROUTERS, f"model.moe.router '{self.router}' not in {ROUTERS}")
        _require(self.gates in GATES, f"model.moe.gates '{self.gates}' not in {GATES}")
        _require(1 <= k <= E, f"model.moe.top_k={k} must be in [1, num_experts={E}]")
        _require(
            self.second_policy in SECOND_POLICIES,
            f"model.moe.second_policy '{self.second_policy}' not in {SECOND_POLICIES}",
        )
        _require(
            self.second_policy == "all" or k == 2,
            f"model.moe.second_policy='random' needs top_k=2, got top_k={k}",
        )
        for name in ("capacity_factor", "eval_capacity_factor", "serve_capacity_factor"):
            cf = getattr(self, name)
            _require(cf is None or cf > 0, f"model.moe.{name} must be > 0, got {cf}")
        _require(self.capacity_factor is not None, "model.moe.capacity_factor must be set")
        _require(
            self.min_capacity >= 1, f"model.moe.min_capacity must be >= 1, got {self.min_capacity}"
        )
        _require(self.group_size >= 0, f"model.moe.group_size must be >= 0, got {self.group_size}")
        _require(0.0 <= self.jitter < 1.0, f"model.moe.jitter must be in [0, 1), got {self.jitter}")
        for name in ("aux_loss_coef", "z_loss_coef"):
            _require(getattr(self, name) >= 0, f"model.moe.{name} must be >= 0")
        _require(
            self.every >= 1 and 0 <= self.offset < self.every,
            f"model.moe needs every >= 1 and 0 <= offset < every, got {self.every}, {self.offset}",
        )
        _require(
            self.causal_fallback in FALLBACKS,
            f"model.moe.causal_fallback '{self.causal_fallback}' not in {FALLBACKS}",
        )
        if self.router == "expert_choice":
            _require(
                self.gates == "softmax" and not self.batch_priority,
                "model.moe: expert_choice uses softmax gates and no batch_priority",
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MoEConfig:
        d = dict(d)
        check_keys(cls, d, "model.moe config")
        return cls(**d)

    def is_moe_layer(self, layer: int) -> bool:
        return layer % self.every == self.offset

    def capacity_factor_for(self, mode: str) -> float | None:
        """The capacity factor of a mode ("train", "eval", "serve"); None means dropless."""
        if mode == "serve":
            return self.serve_capacity_factor
        if mode == "eval" and self.eval_capacity_factor is not None:
            return self.eval_capacity_factor
        return self.capacity_factor

    def capacity(self, group_size: int, cf: float) -> int:
        """Expert slots C per group of `group_size` tokens at capacity factor cf."""
        k = 1 if self.router == "expert_choice" else self.top_k
        c = math.ceil(cf * k * group_size / self.num_experts - 1e-9)
        return min(group_size, max(self.min_capacity, c))


def check_servable(cfg) -> None:
    """Raise a ConfigError if a model (ModelConfig) cannot decode causally.

    Serving entry points call this at start-up: an expert-choice router looks
    at the whole group, so it needs a causal fallback to serve.
    """
    moe = getattr(cfg, "moe", None)
    if moe is not None and moe.router == "expert_choice" and moe.causal_fallback == "none":
        raise ConfigError(
            "model.moe.router='expert_choice' sees future tokens of its group and cannot "
            "decode causally; set model.moe.causal_fallback='top_k' to serve it"
        )
