"""Step-time model: predicted device seconds of a step, fitted online from measured steps.

DistServe's form (reference/algorithms.md): a prefill step costs
`a + b * tokens + c * attention pairs`, a decode iteration `a + b * context + c * batch`.
Here one linear model covers both kinds of step:

    t = a_kind + b * prefill_tokens + c * prefill_attention_pairs
              + d * decode_tokens + e * decode_context

fitted by least squares on the engine's recent step records (per decode
iteration for slices). Until enough steps are seen, a prior calibrated for a
small model on a CPU is used. Policies use it for quanta (FastServe), slice
time budgets (SCLS) and TTFT estimates (deadlines); the simulator uses it as
its device.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np


@dataclasses.dataclass
class StepTimeModel:
    base_mixed: float = 2e-3
    base_decode: float = 1e-3
    per_prefill_token: float = 2e-5
    per_prefill_pair: float = 1e-9
    per_decode_token: float = 6e-5
    per_decode_ctx: float = 1e-8
    min_samples: int = 16
    window: int = 512
    refit_every: int = 64

    def __post_init__(self):
        self._rows: collections.deque = collections.deque(maxlen=self.window)
        self._seen = 0

    # -- prediction ----------------------------------------------------------------

    def step_time(self, prefill_tokens=0, prefill_pairs=0, decode_tokens=0, decode_ctx=0) -> float:
        base = self.base_mixed if prefill_tokens else self.base_decode
        return max(
            1e-6,
            base
            + self.per_prefill_token * prefill_tokens
            + self.per_prefill_pair * prefill_pairs
            + self.per_decode_token * decode_tokens
            + self.per_decode_ctx * decode_ctx,
        )

    def prefill_time(self, prompt_len: int) -> float:
        """Seconds to prefill one prompt alone (FastServe's T_prefill)."""
        return self.step_time(prefill_tokens=prompt_len, prefill_pairs=prompt_len * prompt_len // 2)

    def decode_time(self, batch: int, ctx: int) -> float:
        """Seconds of one decode iteration for `batch` sequences holding `ctx` tokens in all."""
        return self.step_time(decode_tokens=batch, decode_ctx=ctx)

    def slice_time(self, batch: int, ctx: int, iters: int) -> float:
        """Seconds of `iters` decode iterations from `ctx` tokens in all, each adding `batch`:
        the sum of `decode_time(batch, ctx + i * batch)` in closed form."""
        first = self.base_decode + self.per_decode_token * batch + self.per_decode_ctx * ctx
        if first < 1e-6 or self.per_decode_ctx < 0:  # the floor of step_time may bind: add up
            return sum(self.decode_time(batch, ctx + i * batch) for i in range(iters))
        return iters * first + self.per_decode_ctx * batch * (iters * (iters - 1) // 2)

    def simulate(
        self,
        shape,
        entries: int,
        new_tokens: int,
        prefill_tokens: int,
        prefill_pairs: int,
        decode_tokens: int,
        decode_ctx: int,
        iters: int,
        woke: bool = False,
    ) -> tuple[float, float, float]:
        """The simulator's step (`lab.simulator.SimRunner`): host seconds before the device,
        device seconds, host seconds after. This model knows device time only. A mixed step's
        features are as in `step_time`; a slice's are its `decode_tokens` sequences holding
        `decode_ctx` tokens at the start, running `iters` iterations."""
        if shape.kind == "mixed":
            t = self.step_time(prefill_tokens, prefill_pairs, decode_tokens, decode_ctx)
        else:
            t = self.slice_time(decode_tokens, decode_ctx, iters)
        return 0.0, t, 0.0

    # -- fitting --------------------------------------------------------------------

    def observe(self, rec) -> None:
        """Add one StepRecord (a slice counts as `iters` identical iterations)."""
        if rec.kind == "decode":
            n = max(1, rec.iters)
            row = (0.0, 0.0, 0.0, rec.num_decode, rec.decode_ctx, rec.device_s / n)
        else:
            row = (
                1.0,
                rec.num_prefill_tokens,
                rec.prefill_attn,
                rec.num_decode,
                rec.decode_ctx,
                rec.device_s,
            )
        self._rows.append(row)
        self._seen += 1
        if self._seen == self.min_samples or (
            self._seen > self.min_samples and self._seen % self.refit_every == 0
        ):
            self.fit()

    def fit(self) -> None:
        rows = np.asarray(self._rows, np.float64)
        mixed, x, y = rows[:, 0], rows[:, 1:5], rows[:, 5]
        features = np.column_stack([mixed, 1 - mixed, x])
        scale = np.maximum(np.abs(features).max(axis=0), 1e-12)
        coef, *_ = np.linalg.lstsq(features / scale, y, rcond=None)
        coef = np.maximum(coef / scale, 0.0)  # costs are never negative
        if len(set(mixed)) < 2:  # one kind of step seen: keep the prior for the other base
            coef[0 if mixed[0] == 0 else 1] = self.base_mixed if mixed[0] == 0 else self.base_decode
        (
            self.base_mixed,
            self.base_decode,
            self.per_prefill_token,
            self.per_prefill_pair,
            self.per_decode_token,
            self.per_decode_ctx,
        ) = map(float, coef)
