"""The simulator's step time fitted to a real engine (`lab.calibrate.fit_cost` fits it):

- `StepRow`: one step's features, as the simulator computes them from a plan
  (`step_row` reads them off a real step record);
- `CalibratedCost`: device time per compiled shape and kind, host time before and after
  the device, the gaps of the driver's loop, an idle engine's wake-up, and optionally
  the machine's measured speed spread, drawn per window;
- `RecordedCost`: a real run's own step times replayed (the simulator's own error, with
  the cost model taken out).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import pathlib
from collections.abc import Sequence

import numpy as np

KINDS = ("mixed", "decode")
NOISE_QUANTILES = 101  # stored quantiles of each noise ratio (0%, 1%, ..., 100%)
NOISE_DRAWS = 4099  # draws precomputed per noise and cycled (a prime: no beat with step patterns)
NOISE_WINDOW_S = 0.25  # the machine's speed is drawn per window of this many busy seconds
NOISES = ("slow", *KINDS)
MIN_WINDOW_STEPS = 5  # a window with fewer steps does not measure the machine's speed


# ---------------------------------------------------------------------------
# One step's features, as the simulator computes them from a plan
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepRow:
    """What the fit sees of one measured step (the arguments of `CalibratedCost.simulate`)."""

    kind: str
    dims: tuple[int, ...]  # (D, L, Tp) or (D, S)
    entries: int  # plan entries (decodes + prefill chunks)
    new_tokens: int
    prefill_tokens: int
    prefill_pairs: int
    decode_tokens: int  # mixed: decode positions; slice: decoding sequences
    decode_ctx: int  # tokens the decoding sequences held before the step
    iters: int
    device_s: float
    before_s: float  # host, until the tokens were stamped
    after_s: float  # host, postprocess

    @property
    def slice_ctx(self) -> int:
        """Context tokens a slice's iterations read in all (each iteration adds a token per
        sequence)."""
        B, n = self.decode_tokens, self.iters
        return n * self.decode_ctx + B * (n * (n - 1) // 2)


def step_row(rec) -> StepRow:
    """A StepRecord's features. Records count context after the step: each decode of a mixed
    step advanced one position, a slice's sequences one per token they kept."""
    if rec.kind == "mixed":
        decode_tokens, ctx = rec.num_decode, rec.decode_ctx - rec.num_decode
    else:
        decode_tokens, ctx = rec.num_decode, rec.decode_ctx - rec.new_tokens
    return StepRow(
        kind=rec.kind,
        dims=tuple(rec.shape),
        entries=rec.num_decode + rec.num_prefill_seqs,
        new_tokens=rec.new_tokens,
        prefill_tokens=rec.num_prefill_tokens,
        prefill_pairs=rec.prefill_attn,
        decode_tokens=decode_tokens,
        decode_ctx=ctx,
        iters=rec.iters,
        device_s=rec.device_s,
        before_s=rec.host_s - rec.post_s,
        after_s=rec.post_s,
    )


# ---------------------------------------------------------------------------
# The calibrated step-time model
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class CalibratedCost:
    """A real engine's step time per compiled shape, device and host; the simulator's device.

    Times in seconds. Host terms are (base, per entry, per prefill token) before the device
    step and (base, per entry, per new token) after it, per kind."""

    mixed_base: dict[tuple[int, int, int], float]
    mixed_fallback: tuple[float, float, float]  # unseen (D, L, Tp): c0 + c1 * Tp + c2 * D * L
    per_prefill_pair: float
    per_mixed_ctx: float
    slice_call: float
    slice_iter: dict[int, float]  # D -> seconds per iteration
    slice_fallback: tuple[float, float]  # unseen D: c0 + c1 * D per iteration
    per_slice_ctx: float  # per context token per iteration
    host_before: dict[str, tuple[float, float, float]]
    host_after: dict[str, tuple[float, float, float]]
    gap_s: float = 0.0  # from one busy step's end to the next one's start
    wake_s: float = 0.0  # from an arrival at an idle engine to its step's start (the clock's)
    # quantiles of the noise ratios (`device_noise`): "slow" per window of `noise_window_s`
    # busy seconds, "mixed" / "decode" per step; empty: deterministic
    noise: dict[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)
    noise_window_s: float = NOISE_WINDOW_S
    seed: int = 0

    def __post_init__(self):
        self._draws: dict[str, list[float]] = {}
        self._next = dict.fromkeys(NOISES, 0)
        self._busy = self._window_end = 0.0  # simulated busy seconds; the window's end
        self._slow = 1.0

    # -- prediction -------------------------------------------------------------------

    def mixed_device(self, D: int, L: int, Tp: int, pairs: int = 0, ctx: int = 0) -> float:
        base = self.mixed_base.get((D, L, Tp))
        if base is None:
            c0, c1, c2 = self.mixed_fallback
            base = c0 + c1 * Tp + c2 * D * L
        return base + self.per_prefill_pair * pairs + self.per_mixed_ctx * ctx

    def slice_device(self, D: int, iters: int, slice_ctx: int = 0) -> float:
        per_iter = self.slice_iter.get(D)
        if per_iter is None:
            c0, c1 = self.slice_fallback
            per_iter = c0 + c1 * D
        return self.slice_call + iters * per_iter + self.per_slice_ctx * slice_ctx

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
        """(host before the device, device, host after) seconds of one step; see
        `StepTimeModel.simulate` for the features."""
        kind = shape.kind
        if kind == "mixed":
            device = self.mixed_device(shape.D, shape.L, shape.Tp, prefill_pairs, decode_ctx)
        else:
            n = iters
            ctx = n * decode_ctx + decode_tokens * (n * (n - 1) // 2)
            device = self.slice_device(shape.D, n, ctx)
        a, b, c = self.host_before[kind]
        before = a + b * entries + c * prefill_tokens
        a, b, c = self.host_after[kind]
        # the gap (bookkeeping, the driver's loop) follows the step: arrivals are looked at
        # early in it, as the real loop does
        after = a + b * entries + c * new_tokens + self.gap_s
        if self.noise:
            if self._busy >= self._window_end:  # a new window: the machine's speed changes
                self._slow = self._draw("slow")
                self._window_end = self._busy + self.noise_window_s
            slow = self._slow
            device *= slow * self._draw(kind)
            before, after = before * slow, after * slow
            self._busy += before + device + after
        return before, device, after

    def wake_time(self) -> float:
        """Seconds an idle engine takes to notice an arrival (`SimClock.advance_to`)."""
        return self.wake_s

    def predict(self, row: StepRow) -> tuple[float, float, float]:
        """`simulate` for a measured step's features (the mean, without noise)."""
        if row.kind == "mixed":
            D, L, Tp = row.dims
            device = self.mixed_device(D, L, Tp, row.prefill_pairs, row.decode_ctx)
        else:
            device = self.slice_device(row.dims[0], row.iters, row.slice_ctx)
        a, b, c = self.host_before[row.kind]
        before = a + b * row.entries + c * row.prefill_tokens
        a, b, c = self.host_after[row.kind]
        return before, device, a + b * row.entries + c * row.new_tokens

    def _draw(self, kind: str) -> float:
        draws = self._draws.get(kind)
        if draws is None:
            q = np.asarray(self.noise.get(kind) or (1.0,), np.float64)
            u = np.random.default_rng([self.seed, NOISES.index(kind)]).random(NOISE_DRAWS)
            draws = self._draws[kind] = np.interp(u, np.linspace(0, 1, len(q)), q).tolist()
        i = self._next[kind]
        self._next[kind] = (i + 1) % NOISE_DRAWS
        return draws[i]

    # -- storage -----------------------------------------------------------------------

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["mixed_base"] = {",".join(map(str, k)): v for k, v in self.mixed_base.items()}
        d["slice_iter"] = {str(k): v for k, v in self.slice_iter.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CalibratedCost:
        d = dict(d)
        d["mixed_base"] = {
            tuple(int(x) for x in k.split(",")): float(v) for k, v in d["mixed_base"].items()
        }
        d["slice_iter"] = {int(k): float(v) for k, v in d["slice_iter"].items()}
        for key in ("mixed_fallback", "slice_fallback"):
            d[key] = tuple(d[key])
        for key in ("host_before", "host_after"):
            d[key] = {k: tuple(v) for k, v in d[key].items()}
        d["noise"] = {k: tuple(v) for k, v in d.get("noise", {}).items()}
        return cls(**d)

    def save(self, path: str | pathlib.Path) -> None:
        pathlib.Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | pathlib.Path) -> CalibratedCost:
        return cls.from_dict(json.loads(pathlib.Path(path).read_text()))


class RecordedCost:
    """A real run's measured step times, replayed in order: the simulator's mechanics check.

    Step i of the simulation takes step i's measured host and device seconds, then the
    measured gap to the next step (or, when the engine idled, the next step waits for the
    measured wake-up from the arrival that woke it). Served the same trace, the simulator
    must step as the real engine did: same kinds, shapes and batch composition, step for
    step, and nearly the same latencies; what a `CalibratedCost` loses beyond that is its
    model of step time.

    Where in a gap the real loop looked for arrivals is known only where it added some:
    `added` (the wall times requests were added at) places it there, else at the step's
    end. An arrival within microseconds of that point can still be seen one step earlier
    or later; from there on the replay drifts, and steps past the recorded ones take
    `fallback`'s times."""

    def __init__(self, records: Sequence, arrivals: Sequence[float], fallback=None, added=()):
        self.fallback = fallback
        arr, added = sorted(arrivals), sorted(added)
        n = len(records)
        lead, woke_lead, wake, after = [0.0] * n, [0.0] * n, [0.0] * n, [0.0] * n
        for i, rec in enumerate(records):
            start = rec.t - rec.host_s - rec.device_s
            after[i] += rec.post_s
            prev_t = records[i - 1].t if i else -float("inf")
            k = bisect.bisect_right(added, prev_t)
            top = added[k] if k < len(added) and added[k] < start else None  # first add
            j = bisect.bisect_right(arr, prev_t)
            if i == 0 or records[i - 1].running + records[i - 1].waiting == 0:  # woke up
                first = arr[j] if j < len(arr) else start
                noticed = start if top is None else top
                wake[i] = max(0.0, noticed - max(first, prev_t))
                woke_lead[i] = lead[i] = start - noticed
                if i == 0:  # not woken (a burst at t=0): from the first arrival
                    lead[0] = max(0.0, start - arr[0]) if arr else 0.0
            elif top is None:  # the loop looked right after the step ended
                lead[i] = start - prev_t
            else:  # it looked where it added the first request
                after[i - 1] += top - prev_t
                lead[i] = start - top
        self.steps = [
            (lead[i], woke_lead[i], wake[i], r.host_s - r.post_s, r.device_s, after[i])
            for i, r in enumerate(records)
        ]
        self.i = 0

    def simulate(self, shape, *features) -> tuple[float, float, float]:
        """`CalibratedCost.simulate`'s signature; of the features only the last (woke) counts."""
        woke = features[-1]
        if self.i >= len(self.steps):
            if self.fallback is None:
                raise IndexError(
                    f"the simulation ran more steps than the {len(self.steps)} recorded"
                )
            return self.fallback.simulate(shape, *features)
        lead, woke_lead, _, before, device, after = self.steps[self.i]
        self.i += 1
        return before + (woke_lead if woke else lead), device, after

    def wake_time(self) -> float:
        """The next step's measured wake-up (`SimClock.advance_to`)."""
        if self.i < len(self.steps):
            return self.steps[self.i][2]
        return self.fallback.wake_time() if self.fallback is not None else 0.0
