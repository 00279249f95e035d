"""Requests and their sequences: sampling parameters, lifecycle, per-token timestamps.

A request with `n > 1` holds n sequences that share the prompt's KV pages
(copy-on-write). Each sequence catches its `num_computed` up with its tokens
(prompt + generated), as in vLLM v1 and Sarathi-Serve: there is no separate
prefill or decode phase.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence


class RequestError(ValueError):
    """A request is invalid; nothing about it was accepted."""


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted by swap: KV lives in host memory
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    stop_tokens: tuple[int, ...] = ()
    n: int = 1
    seed: int = 0
    ignore_eos: bool = False

    def __post_init__(self):
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens must be >= 1"),
            (math.isfinite(self.temperature) and self.temperature >= 0, "temperature must be >= 0"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (isinstance(self.n, int) and self.n >= 1, "n must be >= 1"),
            (isinstance(self.seed, int) and 0 <= self.seed < 2**31, "seed must be in [0, 2^31)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise RequestError(f"invalid sampling params: {msg} ({self})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclasses.dataclass(eq=False)
class Seq:
    """One generated continuation of a request, with its own block table."""

    request: Request
    index: int  # 0..n-1 within the request
    tokens: list[int]  # prompt + generated
    pages: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in `pages`
    num_cached: int = 0  # prompt tokens served from the prefix cache at admission
    page_hashes: list[int] = dataclasses.field(default_factory=list)  # of full pages
    done: bool = False
    finish_reason: str | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)

    @property
    def prompt_len(self) -> int:
        return self.request.prompt_len

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def output(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def remaining(self) -> int:
        """Tokens still to compute before this sequence can sample its next token."""
        return len(self.tokens) - self.num_computed

    @property
    def id(self) -> str:
        return f"{self.request.id}/{self.index}" if self.request.sampling.n > 1 else self.request.id


@dataclasses.dataclass(eq=False)
class Request:
    id: str
    prompt: list[int]
    sampling: SamplingParams
    arrival: float
    client: str = "default"
    priority: int = 0  # larger = more important
    deadline: float | None = None  # TTFT deadline (absolute time), for SLO-aware policies
    order: int = 0  # arrival sequence number: breaks ties between equal arrival times
    status: Status = Status.WAITING
    seqs: list[Seq] = dataclasses.field(default_factory=list)
    first_scheduled: float | None = None
    finished_at: float | None = None
    preemptions: int = 0
    error: str | None = None

    def __post_init__(self):
        if not self.seqs:
            self.seqs = [Seq(self, 0, list(self.prompt))]

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    @property
    def live_seqs(self) -> list[Seq]:
        return [s for s in self.seqs if not s.done]

    @property
    def is_finished(self) -> bool:
        return self.status in (Status.FINISHED, Status.ABORTED)

    @property
    def fcfs_key(self) -> tuple[float, int]:
        return (self.arrival, self.order)

    def outputs(self) -> list[list[int]]:
        return [s.output for s in self.seqs]


def validate_prompt(
    prompt: Sequence[int], vocab_size: int, max_len: int, max_tokens: int
) -> list[int]:
    """The prompt as a list of ints, or a RequestError saying what is wrong with it."""
    try:
        tokens = [int(t) for t in prompt]
    except (TypeError, ValueError) as e:
        raise RequestError(f"prompt must be a sequence of token ids: {e}") from e
    if not tokens:
        raise RequestError("empty prompt: a request needs at least one prompt token")
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    if len(tokens) + max_tokens > max_len:
        raise RequestError(
            f"prompt ({len(tokens)} tokens) + max_tokens ({max_tokens}) exceeds the context "
            f"length {max_len}"
        )
    return tokens
