"""Discrete-event simulation of the engine: the same scheduler and policies, a modelled device.

`SimRunner` stands in for `Runner`: it builds no model and runs nothing; each
step takes the time a cost model predicts on a `SimClock` that the engine
reads. The cost model is a `StepTimeModel` (device time only: its prior, or
fitted online) or a `lab.step_cost.CalibratedCost` fitted per compiled shape
from a real engine's step records, with the host's time around each step.
Sampled tokens are pseudo-random ids that never hit a stop token, so requests
run to their length, as serving benchmarks do. Policy code runs unchanged, so
a policy's behaviour under a long overloaded trace can be studied in seconds.

    clock = SimClock()
    engine = Engine(SimModel(model_cfg), cfg, runner=SimRunner(model_cfg, cfg, clock), clock=clock)

A simulated step, as the real engine's: the host schedules and builds the batch
(`before`), the device runs, the tokens are stamped, the host postprocesses
(`after`, held as the clock's `pending` until the next step or `settle`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.cost_model import StepTimeModel
from mlx_sched.serve.interface import StepResult
from mlx_sched.serve.plan import StepPlan
from mlx_sched.serve.shapes import shape_for

TOKEN_POOL = 1 << 16  # pseudo-random ids drawn once; steps take consecutive windows


class SimClock:
    """Virtual seconds; the simulated device advances it, idle replays jump it.

    `pending` is host time the engine still spends after the current instant (a step's
    postprocess): the next simulated step, `settle()` or `advance_to()` adds it. An idle
    engine notices an arrival `wake()` seconds late (the runner sets it from its cost: a
    real loop sleeps and wakes up), so arrivals within that time join the same step; `woke`
    says that the last `advance_to` jumped over idle time."""

    def __init__(self, start: float = 0.0):
        self.now = start
        self.pending = 0.0
        self.woke = False
        self.wake: Callable[[], float] | None = None

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> None:
        self.now += dt

    def settle(self) -> None:
        """Finish the host work in flight (a driver's loop runs after the step's postprocess)."""
        self.now += self.pending
        self.pending = 0.0

    def advance_to(self, t: float) -> None:
        self.settle()
        if t > self.now:
            self.now, self.woke = t + (self.wake() if self.wake is not None else 0.0), True


@dataclasses.dataclass
class SimModel:
    """What the engine reads of a model when nothing is computed: its config."""

    cfg: object


class SimRunner:
    """A `StepRunner` whose device is a cost model: same buckets (`shape_for`), no compute.

    `cost` is a `StepTimeModel` (the default: its prior) or anything with its `simulate`
    method, e.g. a calibrated `lab.step_cost.CalibratedCost`."""

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
        clock.wake = getattr(self.cost, "wake_time", None)
        self.max_len = cfg.max_len(model_cfg.max_seq_len)
        self.rng = np.random.default_rng(seed)
        # ids from the upper half of the vocabulary: never a byte-level stop token
        lo = model_cfg.vocab_size // 2
        self._pool = self.rng.integers(lo, model_cfg.vocab_size, TOKEN_POOL).tolist()
        self._next = 0
        self.steps = self.batches = 0  # steps simulated; batches: iterations (mixed steps: 1)

    @property
    def compiles_since_warmup(self) -> int:
        return 0

    def warmup(self, progress=None) -> int:
        return 0

    def _tokens(self, n: int) -> list[int]:
        i = self._next
        if i + n > TOKEN_POOL:
            i = 0
        self._next = i + n
        return self._pool[i : i + n]

    def run(self, plan: StepPlan) -> StepResult:
        shape = shape_for(plan, self.cfg)
        work = plan.work
        prefill_tokens = prefill_pairs = decode_tokens = decode_ctx = 0
        if shape.kind == "mixed":
            iters, new, counts = 1, 0, []
            for s, n in work:
                c, L = s.num_computed, len(s.tokens)
                if L - c == 1:  # a decode (with drafts: n positions, n samples)
                    decode_tokens += n
                    decode_ctx += c
                    new += n
                    counts.append(n)
                else:  # a prefill chunk: one sample, new if the chunk reaches the end
                    prefill_tokens += n
                    prefill_pairs += n * (c + n)
                    new += c + n >= L
                    counts.append(1)
        else:  # a slice: every entry decodes, n iterations each, the step runs the longest
            counts = [n for _, n in work]
            iters, new = max(counts), sum(counts)
            decode_tokens = len(work)
            decode_ctx = sum(s.num_computed for s, _ in work)
        clock = self.clock
        before, device, after = self.cost.simulate(
            shape,
            len(work),
            new,
            prefill_tokens,
            prefill_pairs,
            decode_tokens,
            decode_ctx,
            iters,
            clock.woke,
        )
        clock.now += clock.pending + before + device
        clock.pending, clock.woke = after, False
        self.steps += 1
        self.batches += iters
        tokens = self._tokens
        return StepResult(shape.kind, shape.dims, [tokens(c) for c in counts], None, iters, device)

    def read_pages(self, pages):
        """Zero K and V of the real shape [N, pages, Z, K, X] and dtype, allocating nothing
        (a broadcast scalar), so moves and swaps count the bytes a real engine would."""
        m, z = self.model_cfg, self.cfg.page_size
        kv = self.cfg.kv_dtype or m.dtype
        shape = (m.n_layers, len(pages), z, m.n_kv_heads, m.head_dim)
        x = np.broadcast_to(np.zeros((), np.float16 if kv == "bfloat16" else np.float32), shape)
        return x, x

    def write_pages(self, pages, k, v) -> None:
        return None


def sim_engine(model_cfg, cfg: ServeConfig, cost=None, seed: int = 0):
    """An engine on a simulated device: `SimRunner` with `cost`, a fresh `SimClock`."""
    from mlx_sched.serve.engine import Engine

    clock = SimClock()
    runner = SimRunner(model_cfg, cfg, clock, cost, seed)
    return Engine(SimModel(model_cfg), cfg, runner=runner, clock=clock)
