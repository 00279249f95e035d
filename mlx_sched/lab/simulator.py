"""Discrete-event simulation of the engine: the same scheduler and policies, a modelled device.

`SimRunner` stands in for `Runner`: it builds no model and runs nothing; each
step takes the time a `StepTimeModel` predicts (calibrated from a real run,
or its prior) on a `SimClock` that the engine reads. Sampled tokens are
pseudo-random ids that never hit a stop token, so requests run to their
length, as serving benchmarks do. Policy code runs unchanged, so a policy's
behaviour under a long overloaded trace can be studied in seconds.

    clock = SimClock()
    engine = Engine(SimModel(model_cfg), cfg, runner=SimRunner(model_cfg, cfg, clock), clock=clock)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.cost_model import StepTimeModel
from mlx_sched.serve.runner import StepResult, _bucket, stop_ids


class SimClock:
    """Virtual seconds; the simulated device advances it, idle replays jump it."""

    def __init__(self, start: float = 0.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> None:
        self.now += dt

    def advance_to(self, t: float) -> None:
        self.now = max(self.now, t)


@dataclasses.dataclass
class SimModel:
    """What the engine reads of a model when nothing is computed: its config."""

    cfg: object


class SimRunner:
    def __init__(
        self,
        model_cfg,
        cfg: ServeConfig,
        clock: SimClock,
        cost: StepTimeModel | None = None,
        seed: int = 0,
    ):
        self.cfg, self.model_cfg, self.clock = cfg, model_cfg, clock
        self.cost = cost or StepTimeModel()
        self.max_len = cfg.max_len(model_cfg.max_seq_len)
        self.rng = np.random.default_rng(seed)
        self.compiles_since_warmup = 0
        self._host: dict[int, int] = {}

    def warmup(self, progress=None) -> int:
        return 0

    def stop_ids(self, s) -> list[int]:
        return stop_ids(s, self.cfg.eos_token)

    def _tokens(self, n: int) -> np.ndarray:
        # ids from the upper half of the vocabulary: never a byte-level stop token
        lo = self.model_cfg.vocab_size // 2
        return self.rng.integers(lo, self.model_cfg.vocab_size, n).astype(np.int32)

    def run_mixed(self, decode, prefill, copies=()) -> StepResult:
        D = 0 if not decode else _bucket(self.cfg.decode_buckets, len(decode))
        n_pre = sum(n for _, n in prefill)
        Tp = _bucket(self.cfg.prefill_buckets, max(1, n_pre))
        dt = self.cost.step_time(
            prefill_tokens=n_pre,
            prefill_pairs=sum(n * (s.num_computed + n) for s, n in prefill),
            decode_tokens=len(decode),
            decode_ctx=sum(s.num_computed for s in decode),
        )
        self.clock.advance(dt)
        R = self.cfg.max_prefill_rows
        return StepResult("mixed", (D, Tp), self._tokens(D + R), np.zeros(D + R), 1, dt)

    def run_decode(self, decode, steps_per_seq, copies=()) -> StepResult:
        D = _bucket(self.cfg.decode_buckets, len(decode))
        S = self.cfg.slice_len
        iters = max(steps_per_seq) if steps_per_seq else 0
        ctx = sum(s.num_computed for s in decode)
        dt = sum(self.cost.decode_time(len(decode), ctx + i * len(decode)) for i in range(iters))
        self.clock.advance(dt)
        toks = self._tokens(S * D).reshape(S, D)
        return StepResult("decode", (D, S), toks, np.zeros((S, D)), iters, dt)

    def swap_out(self, pages):
        n = len(pages)
        return np.zeros((1, n)), np.zeros((1, n))

    def swap_in(self, pages, k, v) -> None:
        return None
