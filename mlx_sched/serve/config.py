"""Serving configuration: page pool, token budget, compiled-shape buckets, slice length, policy."""

from __future__ import annotations

import dataclasses
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
    decode_buckets: tuple[int, ...] = ()  # () = powers of two from 8 up to max_seqs
    prefill_buckets: tuple[int, ...] = ()  # () = powers of four from 32 up to token_budget
    max_context: int = 0  # 0: the model's max_seq_len
    slice_len: int = 1  # decode iterations per call when no prefill is pending (1 = ORCA)
    attn_chunk_pages: int = 8  # pages read per inner-loop iteration of paged attention
    native_kernels: bool = True  # native CPU decode-attention kernel when available
    preemption: str = "recompute"  # or "swap" (KV to host memory and back)
    prefix_caching: bool = True
    max_copies: int = 8  # copy-on-write page copies per step
    eos_token: int = -1  # -1: none
    policy: str = "fcfs"
    policy_args: dict = dataclasses.field(default_factory=dict)  # the policy's own settings
    kv_dtype: str = ""  # "": the model's compute dtype
    seed: int = 0

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
        need(
            self.kv_dtype in ("", "float32", "bfloat16"), "kv_dtype must be '', float32 or bfloat16"
        )
        chunk = self.prefill_chunk or self.token_budget
        need(0 < chunk <= self.token_budget, "prefill_chunk must be in [1, token_budget]")
        object.__setattr__(self, "prefill_chunk", chunk)
        dec = tuple(sorted(set(self.decode_buckets))) or _powers(
            min(8, self.max_seqs), self.max_seqs, 2
        )
        need(dec[-1] == self.max_seqs, f"decode_buckets must end at max_seqs={self.max_seqs}")
        need(dec[0] > 0, "decode_buckets must be > 0")
        object.__setattr__(self, "decode_buckets", dec)
        pre = tuple(sorted(set(self.prefill_buckets))) or _powers(
            min(32, self.token_budget), self.token_budget, 4
        )
        need(pre[-1] == self.token_budget, "prefill_buckets must end at token_budget")
        need(pre[0] > 0, "prefill_buckets must be > 0")
        object.__setattr__(self, "prefill_buckets", pre)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ServeConfig:
        d = dict(d)
        check_keys(cls, d, "serve config")
        for key in ("decode_buckets", "prefill_buckets"):
            if key in d:
                d[key] = tuple(d[key])
        if "policy_args" in d:
            d["policy_args"] = dict(d["policy_args"])
        return cls(**d)

    def context_pages(self, model_max_len: int) -> int:
        """Page-table width: pages for the longest allowed context."""
        ctx = min(self.max_context or model_max_len, model_max_len)
        return -(-ctx // self.page_size)

    def max_len(self, model_max_len: int) -> int:
        return min(self.max_context or model_max_len, model_max_len)
