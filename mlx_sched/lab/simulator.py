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
from mlx_sched.serve.interface import StepResult
from mlx_sched.serve.plan import StepPlan
from mlx_sched.serve.shapes import shape_for


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
    """A `StepRunner` whose device is a cost model: same buckets (`shape_for`), no compute."""

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

    @property
    def compiles_since_warmup(self) -> int:
        return 0

    def warmup(self, progress=None) -> int:
        return 0

    def _tokens(self, n: int) -> list[int]:
        # ids from the upper half of the vocabulary: never a byte-level stop token
        lo = self.model_cfg.vocab_size // 2
        return self.rng.integers(lo, self.model_cfg.vocab_size, n).tolist()

    def run(self, plan: StepPlan) -> StepResult:
        shape = shape_for(plan, self.cfg)
        decodes, prefills = plan.decodes, plan.prefills
        if shape.kind == "mixed":
            dt = self.cost.step_time(
                prefill_tokens=sum(n for _, n in prefills),
                prefill_pairs=sum(n * (s.num_computed + n) for s, n in prefills),
                decode_tokens=sum(n for _, n in decodes),
                decode_ctx=sum(s.num_computed for s, _ in decodes),
            )
            iters = 1
            counts = [n if s.remaining == 1 else 1 for s, n in plan.work]
        else:
            iters = max(n for _, n in plan.work)
            ctx = sum(s.num_computed for s, _ in plan.work)
            B = len(plan.work)
            dt = sum(self.cost.decode_time(B, ctx + i * B) for i in range(iters))
            counts = [n for _, n in plan.work]
        self.clock.advance(dt)
        samples = [self._tokens(c) for c in counts]
        return StepResult(shape.kind, shape.dims, samples, None, iters, dt)

    def read_pages(self, pages):
        n = len(pages)
        return np.zeros((1, n)), np.zeros((1, n))

    def write_pages(self, pages, k, v) -> None:
        return None
