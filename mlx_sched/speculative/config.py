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
    # token trees (SpecInfer): children per node on the draft's main chain (1: a chain). A draft
    # model adds tree_width - 1 siblings at each depth, drawn from its distribution there;
    # prompt lookup merges up to tree_width continuations of different earlier matches. The
    # verify width is gamma * tree_width + 1 positions.
    tree_width: int = 1

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"serve.speculative.kind must be one of {KINDS}, got '{self.kind}'")
        if self.acceptance not in ACCEPTANCE:
            raise ConfigError(
                f"serve.speculative.acceptance must be one of {ACCEPTANCE}, got '{self.acceptance}'"
            )
        if self.gamma < 1:
            raise ConfigError(f"serve.speculative.gamma must be >= 1, got {self.gamma}")
        if self.tree_width < 1:
            raise ConfigError(f"serve.speculative.tree_width must be >= 1, got {self.tree_width}")
        if self.adaptive and self.tree_width > 1:
            raise ConfigError(
                "serve.speculative.adaptive chooses chain lengths; it does not take "
                "tree_width > 1 (set one of them)"
            )
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

    @property
    def nodes(self) -> int:
        """Draft tokens per sequence and step at most: gamma, times tree_width with trees."""
        return self.gamma * self.tree_width

    def check_widths(self, decode_widths: tuple[int, ...]) -> None:
        """gamma drafts (a tree: gamma * tree_width nodes) need a compiled decode width of at
        least that many positions plus one."""
        if self.nodes + 1 > decode_widths[-1]:
            what = f"gamma={self.gamma}" + (
                f" x tree_width={self.tree_width}" if self.tree_width > 1 else ""
            )
            raise ConfigError(
                f"serve.speculative.{what} needs a decode width of {self.nodes + 1} "
                f"positions, but serve.decode_widths={decode_widths} ends at {decode_widths[-1]}"
            )
