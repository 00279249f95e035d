"""Serving configuration: page pool, token budget, compiled-shape buckets, slice length, policy.

Fields hold what the user asked for (`()` / `0` meaning "the default"); what
follows from them (the resolved bucket lists, the chunk size) are properties,
so `dataclasses.replace(cfg, max_seqs=128)` re-derives them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

from models.errors import ConfigError, check_keys

PREEMPTION_MODES = ("recompute", "swap")


def _powers(lo: int, hi: int, factor: int) -> tuple[int, ...]:
    out, v = [], lo
    while v < hi:
        out.append(v)
        v *= factor
    return (*out, hi)


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    page_size: int = 16
    num_pages: int = 1024  # including the null page 0
    max_seqs: int = 64  # running sequences at once (decode slots)
    token_budget: int = 512  # tokens per step: decodes + prefill chunks (Sarathi-Serve's tau)
    max_prefill_rows: int = 4  # sequences that may prefill in one step
    prefill_chunk: int = 0  # max tokens of one sequence in one step; 0: token_budget
    decode_buckets: tuple[int, ...] = ()  # () = powers of two from 16 up to max_seqs
    # () = decode_buckets when given, else powers of four from 16 up to max_seqs
    mixed_decode_buckets: tuple[int, ...] = ()
    prefill_buckets: tuple[int, ...] = ()  # () = powers of four from 32 up to token_budget
    decode_widths: tuple[int, ...] = (1,)  # positions a decoding sequence computes in a step
    max_context: int = 0  # 0: the model's max_seq_len
    slice_len: int = 1  # decode iterations per call when no prefill is pending (1 = ORCA)
    attn_chunk_pages: int = 8  # pages read per inner-loop iteration of paged attention
    native_kernels: bool = True  # native CPU decode-attention kernel when available
    packed_matmuls: bool = True  # with native_kernels: weights packed for the native matmul
    preemption: str = "recompute"  # or "swap" (KV to host memory and back)
    # compile the KV page transfer programs at warm-up even without swap: an engine whose
    # requests move to or from other engines (mlx_sched.cluster: migration, disaggregation)
    kv_transfer: bool = False
    prefix_caching: bool = True
    max_copies: int = 8  # copy-on-write page copies per step
    eos_token: int = -1  # -1: none
    policy: str = "fcfs"
    policy_args: dict = dataclasses.field(default_factory=dict)  # the policy's own settings
    kv_dtype: str = ""  # "": the model's compute dtype
    history: int = 1000  # finished requests and step records kept (-1: all); totals always
    seed: int = 0
    # speculative decoding (mlx_sched.speculative.SpecConfig's fields); {}: off
    speculative: dict = dataclasses.field(default_factory=dict)
    # many LoRA adapters on one base (S-LoRA; mlx_sched.serve.adapters.LoraServeConfig's
    # fields: max_rank, slots, targets, paging); {}: off
    lora: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ConfigError(f"serve.{msg}")

        for name in ("page_size", "num_pages", "max_seqs", "token_budget", "max_prefill_rows"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        need(self.num_pages >= 2, "num_pages must be >= 2 (page 0 is the null page)")
        need(
            self.token_budget >= self.page_size,
            f"token_budget ({self.token_budget}) must be >= page_size ({self.page_size})",
        )
        need(self.slice_len >= 1, f"slice_len must be >= 1, got {self.slice_len}")
        need(self.attn_chunk_pages >= 1, "attn_chunk_pages must be >= 1")
        need(self.preemption in PREEMPTION_MODES, f"preemption must be one of {PREEMPTION_MODES}")
        need(self.max_copies >= 1, "max_copies must be >= 1")
        need(self.max_context >= 0, f"max_context must be >= 0, got {self.max_context}")
        need(self.history >= -1, f"history must be >= 0, or -1 for all, got {self.history}")
        need(
            self.kv_dtype in ("", "float32", "bfloat16"), "kv_dtype must be '', float32 or bfloat16"
        )
        need(
            0 <= self.prefill_chunk <= self.token_budget,
            f"prefill_chunk must be in [0, token_budget={self.token_budget}] (0: the budget), "
            f"got {self.prefill_chunk}",
        )
        for name, sizes, top, what in (
            ("decode_buckets", self.decode_sizes, self.max_seqs, "max_seqs"),
            ("mixed_decode_buckets", self.mixed_decode_sizes, self.max_seqs, "max_seqs"),
            ("prefill_buckets", self.prefill_sizes, self.token_budget, "token_budget"),
        ):
            need(sizes[0] > 0, f"{name} must be > 0, got {getattr(self, name)}")
            need(sizes[-1] == top, f"{name} must end at {what}={top}, got {getattr(self, name)}")
        widths = self.decode_widths
        need(
            bool(widths) and tuple(sorted(set(widths))) == tuple(widths) and widths[0] == 1,
            f"decode_widths must be increasing and start at 1, got {widths}",
        )
        if self.speculative:
            self.spec.check_widths(widths)
        if self.lora:
            need(not self.speculative, "lora: adapters with speculative decoding are not supported")
            self.lora_cfg  # noqa: B018 (validates)

    @functools.cached_property
    def lora_cfg(self):
        """The adapter-serving settings (`LoraServeConfig`), or None when off."""
        from mlx_sched.serve.adapters import LoraServeConfig

        return LoraServeConfig.from_dict(self.lora) if self.lora else None

    @functools.cached_property
    def spec(self):
        """The speculative-decoding settings (`SpecConfig`), or None when off."""
        from mlx_sched.speculative.config import SpecConfig

        return SpecConfig.from_dict(self.speculative) if self.speculative else None

    # -- derived ------------------------------------------------------------------

    @functools.cached_property
    def chunk_tokens(self) -> int:
        """Most tokens one sequence computes in one step (the prefill chunk)."""
        return self.prefill_chunk or self.token_budget

    @functools.cached_property
    def decode_sizes(self) -> tuple[int, ...]:
        """Compiled decode-slot counts D of a decode slice (no prefill). The default steps by
        2x: a padding slot costs its full share of every matmul (on a CPU the decode step is
        compute-bound at these sizes), and each size is one compiled program."""
        return tuple(sorted(set(self.decode_buckets))) or _powers(
            min(16, self.max_seqs), self.max_seqs, 2
        )

    @functools.cached_property
    def mixed_decode_sizes(self) -> tuple[int, ...]:
        """Compiled decode-slot counts D of a mixed step (decodes plus prefill chunks). The
        default steps by 4x: every size is a compiled program per prefill size, and the
        prefill tokens already dominate most mixed steps' rows. Declared `decode_buckets` are
        used for both kinds unless `mixed_decode_buckets` is declared too."""
        declared = self.mixed_decode_buckets or self.decode_buckets
        return tuple(sorted(set(declared))) or _powers(min(16, self.max_seqs), self.max_seqs, 4)

    @functools.cached_property
    def prefill_sizes(self) -> tuple[int, ...]:
        """Compiled prefill-token counts Tp of a mixed step."""
        return tuple(sorted(set(self.prefill_buckets))) or _powers(
            min(32, self.token_budget), self.token_budget, 4
        )

    @functools.cached_property
    def max_width(self) -> int:
        """Most positions (1 + draft tokens) a decoding sequence computes in one step."""
        return self.decode_widths[-1]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ServeConfig:
        d = dict(d)
        check_keys(cls, d, "serve config")
        for key in ("decode_buckets", "mixed_decode_buckets", "prefill_buckets", "decode_widths"):
            if key in d:
                d[key] = tuple(d[key])
        for key in ("policy_args", "speculative", "lora"):
            if key in d:
                d[key] = dict(d[key])
        return cls(**d)

    def context_pages(self, model_max_len: int) -> int:
        """Page-table width: pages for the longest allowed context."""
        return -(-self.max_len(model_max_len) // self.page_size)

    def max_len(self, model_max_len: int) -> int:
        return min(self.max_context or model_max_len, model_max_len)
