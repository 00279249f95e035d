"""The `speculative` section of the serving config."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from models.errors import ConfigError, check_keys

KINDS = ("prompt_lookup", "draft_model")
ACCEPTANCE = ("rejection", "match")


@dataclasses.dataclass(frozen=True)
class SpecConfig:
    kind: str = "prompt_lookup"  # or "draft_model" (the engine is given the draft model)
    gamma: int = 4  # draft tokens per decoding sequence and step
    ngram_max: int = 3  # prompt lookup: longest suffix matched
    ngram_min: int = 1  # prompt lookup: shortest suffix matched
    draft_checkpoint: str = ""  # draft_model: a checkpoint directory the entry points load
    # sampled requests with a draft model: "rejection" (Leviathan: accept with min(1, p/q),
    # the target's distribution) or "match" (accept while the draft equals the target's own
    # sample: the non-speculative output token for token, fewer drafts accepted)
    acceptance: str = "rejection"
    # AdaSpec: each step, drafts per sequence (0 included) from the compiled decode_widths up
    # to gamma, maximising predicted goodput; False: gamma for every decoding sequence
    adaptive: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"serve.speculative.kind must be one of {KINDS}, got '{self.kind}'")
        if self.acceptance not in ACCEPTANCE:
            raise ConfigError(
                f"serve.speculative.acceptance must be one of {ACCEPTANCE}, got '{self.acceptance}'"
            )
        if self.gamma < 1:
            raise ConfigError(f"serve.speculative.gamma must be >= 1, got {self.gamma}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ConfigError(
                "serve.speculative needs 1 <= ngram_min <= ngram_max, got "
                f"{self.ngram_min}, {self.ngram_max}"
            )

    @property
    def rejection(self) -> bool:
        """Verification by Leviathan's rule with the draft's distributions (a draft model's;
        prompt lookup's drafts are point masses, for which the match rule is the same rule)."""
        return self.kind == "draft_model" and self.acceptance == "rejection"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpecConfig:
        check_keys(cls, d, "serve.speculative")
        return cls(**d)

    def check_widths(self, decode_widths: tuple[int, ...]) -> None:
        """gamma drafts need a compiled decode width of at least gamma + 1 positions."""
        if self.gamma + 1 > decode_widths[-1]:
            raise ConfigError(
                f"serve.speculative.gamma={self.gamma} needs a decode width of {self.gamma + 1} "
                f"positions, but serve.decode_widths={decode_widths} ends at {decode_widths[-1]}"
            )
