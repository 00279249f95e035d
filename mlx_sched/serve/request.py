"""Requests and their sequences: sampling parameters, lifecycle, per-token timestamps.

A request with `n > 1` holds n sequences that share the prompt's KV pages
(copy-on-write). Each sequence catches its `num_computed` up with its tokens
(prompt + generated), as in vLLM v1 and Sarathi-Serve: there is no separate
prefill or decode phase.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from collections.abc import Sequence

import numpy as np

_INT = {int}  # the one type of a plain token id (not bool, not numpy)
NUM_STOP_IDS = 8  # stop ids (stop tokens + EOS) per request, checked on device inside a slice


class RequestError(ValueError):
    """A request is invalid; nothing about it was accepted."""


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted by swap: KV lives in host memory
    FINISHED = "finished"
    ABORTED = "aborted"


def _is_int(x) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool | np.bool_)


def _is_number(x) -> bool:
    return (_is_int(x) or isinstance(x, float | np.floating)) and math.isfinite(x)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How a request's tokens are chosen: temperature, then top-k, then top-p over the
    renormalised top-k probabilities (as Hugging Face and vLLM do)."""

    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    stop_tokens: tuple[int, ...] = ()
    n: int = 1
    seed: int = 0
    ignore_eos: bool = False
    logprobs: bool = False  # return each chosen token's log-probability
    adapter: str | None = None  # a LoRA adapter registered with the engine (S-LoRA); None: base

    def __post_init__(self):
        if self._plain():
            return  # valid and of the right types already: nothing to check or convert

        def need(ok: bool, field: str, rule: str):
            if not ok:
                value = getattr(self, field)
                raise RequestError(
                    f"invalid sampling params: {field} {rule}, got {value!r} "
                    f"({type(value).__name__})"
                )

        need(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "must be an int >= 1")
        need(
            _is_number(self.temperature) and self.temperature >= 0,
            "temperature",
            "must be a number >= 0 (0: greedy)",
        )
        need(_is_int(self.top_k) and self.top_k >= 0, "top_k", "must be an int >= 0 (0: off)")
        need(_is_number(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        need(_is_int(self.n) and self.n >= 1, "n", "must be an int >= 1")
        need(_is_int(self.seed) and 0 <= self.seed < 2**31, "seed", "must be an int in [0, 2^31)")
        need(isinstance(self.ignore_eos, bool), "ignore_eos", "must be a bool")
        need(isinstance(self.logprobs, bool), "logprobs", "must be a bool")
        need(
            self.adapter is None or (isinstance(self.adapter, str) and bool(self.adapter)),
            "adapter",
            "must be None or a registered adapter's name",
        )
        stops = self.stop_tokens
        need(
            not isinstance(stops, str | bytes)
            and hasattr(stops, "__iter__")
            and all(_is_int(t) for t in stops),
            "stop_tokens",
            "must be a sequence of int token ids",
        )
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in stops))
        for f in ("max_tokens", "top_k", "n", "seed"):
            object.__setattr__(self, f, int(getattr(self, f)))
        for f in ("temperature", "top_p"):
            object.__setattr__(self, f, float(getattr(self, f)))

    def _plain(self) -> bool:
        """Every field valid and of its exact type (as `__post_init__` would leave it): the
        common case, e.g. `dataclasses.replace` of valid params, checked fast."""
        t, p, stops = self.temperature, self.top_p, self.stop_tokens
        return (
            type(self.max_tokens) is int
            and self.max_tokens >= 1
            and type(t) is float
            and 0.0 <= t < math.inf
            and type(self.top_k) is int
            and self.top_k >= 0
            and type(p) is float
            and 0.0 < p <= 1.0
            and type(self.n) is int
            and self.n >= 1
            and type(self.seed) is int
            and 0 <= self.seed < 2**31
            and type(self.ignore_eos) is bool
            and type(self.logprobs) is bool
            and (self.adapter is None or (type(self.adapter) is str and bool(self.adapter)))
            and type(stops) is tuple
            and (not stops or set(map(type, stops)) == _INT)
        )

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
    logprobs: list[float] = dataclasses.field(default_factory=list)  # when sampling asks
    draft: list[int] = dataclasses.field(default_factory=list)  # proposed next tokens, unverified
    spec_proposed: int = 0  # draft tokens verified for this sequence (speculative decoding)
    spec_accepted: int = 0  # of which the target kept

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

    @functools.cached_property
    def id(self) -> str:
        """Unique within an engine; the key of everything kept per sequence (host KV, policy
        state), so it survives copies, pickling and migration to another engine. (Computed
        once: a sequence's request, index and n never change.)"""
        req = self.request
        return req.id if req.sampling.n == 1 else f"{req.id}/{self.index}"


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
    adapter_slot: int = 0  # its adapter's device slot while it holds one (0: none, S-LoRA)

    def __post_init__(self):
        if not self.seqs:
            self.seqs = [Seq(self, 0, list(self.prompt))]

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    @property
    def live_seqs(self) -> list[Seq]:
        seqs = self.seqs
        if len(seqs) == 1:  # the common case, without a comprehension
            return [] if seqs[0].done else [seqs[0]]
        return [s for s in seqs if not s.done]

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED or self.status is Status.ABORTED

    @property
    def fcfs_key(self) -> tuple[float, int]:
        return (self.arrival, self.order)

    def outputs(self) -> list[list[int]]:
        return [s.output for s in self.seqs]


def validate_prompt(
    prompt: Sequence[int], vocab_size: int, max_len: int, max_tokens: int
) -> list[int]:
    """The prompt as a list of ints, or a RequestError saying what is wrong with it.

    Only integer token ids are accepted (Python ints or a 1-D integer numpy array): a string,
    floats or a float array are refused rather than coerced.
    """
    if isinstance(prompt, np.ndarray):
        if prompt.ndim != 1 or not np.issubdtype(prompt.dtype, np.integer):
            raise RequestError(
                f"prompt must be a 1-D integer array of token ids, got {prompt.dtype} "
                f"with shape {prompt.shape}"
            )
        tokens = [int(t) for t in prompt]
    elif isinstance(prompt, str | bytes) or not isinstance(prompt, Sequence):
        raise RequestError(
            f"prompt must be a sequence of token ids, got {type(prompt).__name__}"
            + ("; tokenize text first" if isinstance(prompt, str | bytes) else "")
        )
    elif set(map(type, prompt)) <= _INT:  # the common case, checked fast (not bools)
        tokens = list(prompt)
    else:
        bad = [t for t in prompt if not _is_int(t)]
        if bad:
            raise RequestError(
                f"prompt must be a sequence of token ids (ints), got {bad[0]!r} "
                f"({type(bad[0]).__name__})"
            )
        tokens = [int(t) for t in prompt]
    if not tokens:
        raise RequestError("empty prompt: a request needs at least one prompt token")
    if min(tokens) < 0 or max(tokens) >= vocab_size:
        bad = [t for t in tokens if not 0 <= t < vocab_size]
        raise RequestError(f"token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    if len(tokens) + max_tokens > max_len:
        raise RequestError(
            f"prompt ({len(tokens)} tokens) + max_tokens ({max_tokens}) exceeds the context "
            f"length {max_len}"
        )
    return tokens


def stop_ids(seq: Seq, eos_token: int) -> list[int]:
    """The token ids that end `seq`: its stop tokens, plus EOS unless ignored."""
    sp = seq.request.sampling
    stops = list(sp.stop_tokens)
    if eos_token >= 0 and not sp.ignore_eos:
        stops.append(eos_token)
    if len(stops) > NUM_STOP_IDS:
        raise ValueError(f"at most {NUM_STOP_IDS - 1} stop tokens per request")
    return stops


@dataclasses.dataclass
class RequestOutput:
    """What one engine step produced for a request (and, through it, everything so far)."""

    request_id: str
    new_tokens: list[list[int]]  # per sequence, the tokens produced by this step
    finished: bool
    request: Request = dataclasses.field(repr=False)

    @property
    def outputs(self) -> list[list[int]]:
        """Per sequence, everything generated so far."""
        return self.request.outputs()

    @property
    def finish_reasons(self) -> list[str | None]:
        return [s.finish_reason for s in self.request.seqs]
