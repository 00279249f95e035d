"""Which attention pattern each layer uses: the `model.attention` section of a ModelConfig."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from models.errors import check_keys
from models.errors import require as _require

PATTERN_NAMES = ("dense", "strided", "fixed")
HEAD_MODES = ("interleave", "union")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Per-layer attention patterns (Sparse Transformer, Child et al. 2019).

    pattern: one name for every layer, or a comma-separated list cycled over
        the layers: "strided,dense" = even layers strided, odd layers dense;
        "strided,fixed" alternates the two sparse families. Names: dense,
        strided, fixed.
    stride: l, the block length of both sparse patterns (about sqrt(length)).
    summary: c, the number of summary positions at the end of each block
        (fixed pattern), 1 <= c <= l.
    heads: how the two sub-patterns A1, A2 of a sparse layer are combined:
        "interleave" (head h attends by A1 if h is even, A2 if odd) or "union"
        (every head attends to A1 | A2).
    """

    pattern: str = "dense"
    stride: int = 128
    summary: int = 8
    heads: str = "interleave"

    def __post_init__(self):
        names = self.layer_patterns
        _require(all(names), f"model.attention.pattern='{self.pattern}' has an empty entry")
        for name in names:
            _require(
                name in PATTERN_NAMES,
                f"model.attention.pattern: unknown pattern '{name}'; "
                f"choose from {', '.join(PATTERN_NAMES)}",
            )
        _require(self.stride > 0, f"model.attention.stride must be > 0, got {self.stride}")
        _require(self.summary > 0, f"model.attention.summary must be > 0, got {self.summary}")
        _require(
            self.summary <= self.stride,
            f"model.attention.summary={self.summary} must be <= stride={self.stride}",
        )
        _require(
            self.heads in HEAD_MODES,
            f"model.attention.heads='{self.heads}' is not one of {', '.join(HEAD_MODES)}",
        )

    def check_model(self, n_layers: int, n_heads: int) -> None:
        """Checks that need the model's shape (called by ModelConfig)."""
        names = self.layer_patterns
        _require(
            len(names) <= n_layers,
            f"model.attention.pattern lists {len(names)} patterns for {n_layers} layers",
        )
        _require(
            self.heads != "interleave" or n_heads >= 2 or set(names) == {"dense"},
            "model.attention.heads='interleave' needs n_heads >= 2; use heads='union'",
        )

    @property
    def layer_patterns(self) -> tuple[str, ...]:
        """The pattern names listed in `pattern`, cycled over layers."""
        return tuple(p.strip() for p in self.pattern.split(","))

    def pattern_name(self, layer: int) -> str:
        names = self.layer_patterns
        return names[layer % len(names)]

    @classmethod
    def from_any(cls, value: Any) -> AttentionConfig:
        """An AttentionConfig from itself, a mapping or a ConfigDict; unknown keys are errors."""
        if isinstance(value, cls):
            return value
        if hasattr(value, "to_dict"):
            value = value.to_dict()
        if not isinstance(value, Mapping):
            _require(False, f"model.attention must be a mapping, got {type(value).__name__}")
        check_keys(cls, value, "model.attention")
        return cls(**value)
