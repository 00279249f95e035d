"""What the engine asks of a runner: the `StepRunner` protocol and the `StepResult` it returns.

The device runner (`runner.Runner`) and the simulator's (`lab.simulator.SimRunner`)
both satisfy it; both choose a plan's compiled bucket with `shapes.shape_for`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from mlx_sched.serve.plan import StepPlan


@dataclasses.dataclass
class StepResult:
    kind: str  # "mixed" | "decode" (a decode slice)
    shape: tuple  # the compiled bucket's dims: (D, L, Tp) or (D, S)
    samples: list[list[int]]  # per plan entry (plan order): the tokens it sampled
    logprobs: list[list[float]] | None  # the same entries' log-probabilities, when asked for
    iters: int  # iterations run (a slice may stop early; 1 for a mixed step)
    device_s: float  # dispatch -> results on host
    build_s: float = 0.0  # host time spent building the batch
    # a draft model's slice: per entry, the distribution each token was drawn from [n, V]
    probs: list[np.ndarray] | None = None


@runtime_checkable
class StepRunner(Protocol):
    max_len: int

    @property
    def compiles_since_warmup(self) -> int: ...

    def warmup(self, progress: Callable | None = None) -> int: ...

    def run(self, plan: StepPlan) -> StepResult: ...

    def read_pages(self, pages: Sequence[int]) -> tuple[np.ndarray, np.ndarray]: ...

    def write_pages(self, pages: Sequence[int], k: np.ndarray, v: np.ndarray) -> None: ...
