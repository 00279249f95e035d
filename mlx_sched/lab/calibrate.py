"""Calibrate the simulator from a real engine's steps, and measure how far it is off.

`fit_cost(runs)` fits a `CalibratedCost` (the simulator's step time) to the step
records of real runs (`Engine.step_records`, kept with `history=-1`):

- *device*, per compiled shape and kind. A mixed step `(D, L, Tp)` costs a base
  of its own shape plus its attention work, `per_prefill_pair * pairs +
  per_mixed_ctx * decode context`. A decode slice `(D, S)` costs a call plus, per
  iteration, a base of its D and `per_slice_ctx` per context token. A shape
  seen fewer than `min_count` times takes a fallback fitted over the seen
  shapes' bases (linear in Tp and D*L; in D for slices).
- *host*, per kind: before the step's tokens are stamped (scheduling, batch
  building: `a + b * entries + c * prefill tokens`) and after (postprocess:
  `a + b * entries + c * new tokens`); plus the gap between busy steps (the
  driver's loop, bookkeeping) and the wake-up of an idle engine at an arrival.
  On a CPU the host is a tenth or more of a step: a simulator without it is
  wrong by that much.
- optionally the spread around the fit, in two parts: the machine's speed, which
  drifts (measured / fitted step time over windows of 0.25 s: it scales host and
  device time alike for a window), and each step's device time within its window;
  quantiles of both are drawn in the simulation, so that tail latencies see the
  real variance (a request lives through a few windows: a slow one slows all of its
  tokens, which independent per-step noise would average away).

Every coefficient comes from least squares, constrained non-negative. `compare`
reports the simulated mean and P90 TTFT / TPOT against the measured ones with
the targets (mean within 5%, P90 within 10%).
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import json
import pathlib
from collections.abc import Sequence

import numpy as np

KINDS = ("mixed", "decode")
# (metric, statistic, largest relative error allowed)
TARGETS = (
    ("ttft", "mean", 0.05),
    ("tpot", "mean", 0.05),
    ("ttft", "p90", 0.10),
    ("tpot", "p90", 0.10),
)
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


# ---------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------


def nnls(X, y, w=None) -> np.ndarray:
    """Least squares with non-negative coefficients (optionally row weights `w`): solve, drop
    the most negative column, repeat. Columns are scaled first, so units do not matter."""
    X, y = np.asarray(X, np.float64), np.asarray(y, np.float64)
    if w is not None:
        w = np.sqrt(np.asarray(w, np.float64))
        X, y = X * w[:, None], y * w
    coef = np.zeros(X.shape[1])
    keep = np.abs(X).max(axis=0) > 0 if len(X) else np.zeros(X.shape[1], bool)
    while keep.any():
        Xk = X[:, keep]
        scale = np.abs(Xk).max(axis=0)
        c, *_ = np.linalg.lstsq(Xk / scale, y, rcond=None)
        c /= scale
        if (c >= 0).all():
            coef[keep] = c
            break
        keep[np.flatnonzero(keep)[np.argmin(c)]] = False
    return coef


def _fit_mixed(rows: list[StepRow], min_count: int) -> dict:
    counts = collections.Counter(r.dims for r in rows)
    seen = sorted(k for k, n in counts.items() if n >= min_count) or sorted(counts)
    index = {k: i for i, k in enumerate(seen)}
    use = [r for r in rows if r.dims in index]
    X = np.zeros((len(use), len(seen) + 2))
    for j, r in enumerate(use):
        X[j, index[r.dims]] = 1.0
        X[j, -2:] = r.prefill_pairs, r.decode_ctx
    coef = nnls(X, [r.device_s for r in use])
    base = {k: float(coef[i]) for k, i in index.items()}
    if len(seen) >= 3:  # bases linear in the shape's prefill rows and decode positions
        F = [(1.0, Tp, D * L) for D, L, Tp in seen]
        fallback = tuple(map(float, nnls(F, [base[k] for k in seen], [counts[k] for k in seen])))
    else:
        mean = float(np.average([base[k] for k in seen], weights=[counts[k] for k in seen]))
        fallback = (mean, 0.0, 0.0)
    return dict(
        mixed_base=base,
        mixed_fallback=fallback,
        per_prefill_pair=float(coef[-2]),
        per_mixed_ctx=float(coef[-1]),
    )


def _fit_slices(rows: list[StepRow], min_count: int) -> dict:
    counts = collections.Counter(r.dims[0] for r in rows)
    seen = sorted(d for d, n in counts.items() if n >= min_count) or sorted(counts)
    index = {d: i for i, d in enumerate(seen)}
    use = [r for r in rows if r.dims[0] in index]
    X = np.zeros((len(use), len(seen) + 2))
    for j, r in enumerate(use):
        X[j, 0] = 1.0
        X[j, 1 + index[r.dims[0]]] = r.iters
        X[j, -1] = r.slice_ctx
    coef = nnls(X, [r.device_s for r in use])
    per_iter = {d: float(coef[1 + i]) for d, i in index.items()}
    if len(seen) >= 2:
        F = [(1.0, d) for d in seen]
        fallback = tuple(
            map(float, nnls(F, [per_iter[d] for d in seen], [counts[d] for d in seen]))
        )
    else:
        fallback = (per_iter[seen[0]], 0.0)
    return dict(
        slice_call=float(coef[0]),
        slice_iter=per_iter,
        slice_fallback=fallback,
        per_slice_ctx=float(coef[-1]),
    )


def _fit_host(rows: list[StepRow]) -> tuple[dict, dict]:
    before, after = {}, {}
    for kind in KINDS:
        rs = [r for r in rows if r.kind == kind]
        if not rs:
            before[kind] = after[kind] = (0.0, 0.0, 0.0)
            continue
        X = [(1.0, r.entries, r.prefill_tokens) for r in rs]
        before[kind] = tuple(map(float, nnls(X, [r.before_s for r in rs])))
        X = [(1.0, r.entries, r.new_tokens) for r in rs]
        after[kind] = tuple(map(float, nnls(X, [r.after_s for r in rs])))
    return before, after


def busy_gaps(records: Sequence) -> list[float]:
    """Seconds between consecutive steps of one run that were not step time: each step's end
    (its record) to the next one's start, while the engine still had work (idle waits are
    excluded)."""
    out = []
    for prev, rec in zip(records[:-1], records[1:], strict=True):
        if prev.running + prev.waiting > 0:
            out.append(rec.t - prev.t - rec.host_s - rec.device_s)
    return out


def wake_ups(records: Sequence, arrivals: Sequence[float]) -> list[float]:
    """Seconds from an arrival at an idle engine to the start of the step that served it
    (`arrivals`: the run's absolute arrival times, on the records' clock)."""
    arr = sorted(arrivals)
    out = []
    for prev, rec in zip(records[:-1], records[1:], strict=True):
        if prev.running + prev.waiting > 0:
            continue
        i = bisect.bisect_right(arr, prev.t)
        start = rec.t - rec.host_s - rec.device_s
        if i < len(arr) and arr[i] <= start:
            out.append(start - arr[i])
    return out


def fit_cost(
    runs: Sequence[Sequence],
    arrivals: Sequence[Sequence[float]] | None = None,
    min_count: int = 3,
    noise: bool = False,
    seed: int = 0,
) -> CalibratedCost:
    """Fit a `CalibratedCost` to the step records of one or more real runs (each run's records
    in order, as `Engine.step_records` keeps them with history=-1). `arrivals` (per run, the
    requests' absolute arrival times) gives the idle wake-up; `noise` keeps the spread of the
    device time around the fit."""
    rows = [step_row(r) for run in runs for r in run]
    for kind in KINDS:
        if not any(r.kind == kind for r in rows):
            raise ValueError(
                f"no {kind} steps in the records: calibrate on a trace that has both prefills "
                "and decode slices"
            )
    kw = _fit_mixed([r for r in rows if r.kind == "mixed"], min_count)
    kw |= _fit_slices([r for r in rows if r.kind == "decode"], min_count)
    kw["host_before"], kw["host_after"] = _fit_host(rows)
    gaps = [g for run in runs for g in busy_gaps(run)]
    kw["gap_s"] = float(np.mean(gaps)) if gaps else 0.0
    wakes = [w for run, arr in zip(runs, arrivals or [], strict=False) for w in wake_ups(run, arr)]
    kw["wake_s"] = _robust_mean(wakes)
    cost = CalibratedCost(**kw, seed=seed)
    if noise:
        cost.noise = device_noise(cost, runs)
    return cost


def _robust_mean(x: list[float]) -> float:
    """Mean of the values within 10x the median (a mis-paired arrival is not a wake-up)."""
    if not x:
        return 0.0
    med = float(np.median(x))
    return float(np.mean([v for v in x if v <= 10 * med]))


def device_noise(
    cost: CalibratedCost, runs: Sequence[Sequence], window_s: float = NOISE_WINDOW_S
) -> dict[str, tuple[float, ...]]:
    """The measured runs' spread around `cost`, as quantiles rescaled to mean 1 per step (the
    fit has the mean): "slow", the machine's speed per window of `window_s` seconds (measured
    over fitted host + device time of the window's steps); per kind, one step's device time
    over its fitted value and its window's speed."""
    slow, fast = [], {k: [] for k in KINDS}
    for run in runs:
        if not run:
            continue
        windows: dict[int, list] = collections.defaultdict(list)
        for rec in run:
            row = step_row(rec)
            windows[int((rec.t - run[0].t) / window_s)].append((row, cost.predict(row)))
        overall = step_time_ratio(cost, run)
        for steps in windows.values():
            measured = sum(r.before_s + r.device_s + r.after_s for r, _ in steps)
            factor = measured / max(sum(sum(p) for _, p in steps), 1e-12)
            if len(steps) >= MIN_WINDOW_STEPS:
                slow.append(factor)
            else:  # too few steps to tell the machine's speed from one step's
                factor = overall
            fast_kind = [(r.kind, r.device_s / (p[1] * factor)) for r, p in steps if p[1] > 0]
            for kind, ratio in fast_kind:
                fast[kind].append(ratio)
    out = {}
    for key, values in (("slow", slow), *fast.items()):
        if values:
            q = np.quantile(values, np.linspace(0, 1, NOISE_QUANTILES))
            # a step's ratios average to 1; a window's factor stretches a fixed stretch of time,
            # so slow windows hold fewer steps: the factors' harmonic mean is what averages to 1
            # per step (an arithmetic mean of 1 would make the simulated machine faster)
            mean = (
                len(values) / np.sum(1 / np.asarray(values)) if key == "slow" else np.mean(values)
            )
            out[key] = tuple(float(v) for v in q / mean)
    return out


def residuals(cost: CalibratedCost, records: Sequence) -> dict:
    """How well `cost` predicts measured steps, per kind: relative error of the summed device
    and host time, and the median absolute relative error of one step's device time."""
    rows = [step_row(r) for r in records]
    out = {}
    for kind in KINDS:
        rs = [r for r in rows if r.kind == kind]
        if not rs:
            continue
        pred = np.array([cost.predict(r) for r in rs])
        dev = np.array([r.device_s for r in rs])
        host = np.array([r.before_s + r.after_s for r in rs])
        out[kind] = {
            "steps": len(rs),
            "device_sum_error": float(pred[:, 1].sum() / dev.sum() - 1),
            "host_sum_error": float((pred[:, 0] + pred[:, 2]).sum() / max(host.sum(), 1e-12) - 1),
            "device_median_abs_error": float(np.median(np.abs(pred[:, 1] / dev - 1))),
        }
    return out


def same_steps(a: Sequence, b: Sequence) -> int:
    """How many first steps of two runs' records agree in kind, shape, decodes, prefill tokens
    and iterations (a replay that steps as the real run did agrees on all)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if (x.kind, tuple(x.shape), x.num_decode, x.num_prefill_tokens, x.iters) != (
            y.kind,
            tuple(y.shape),
            y.num_decode,
            y.num_prefill_tokens,
            y.iters,
        ):
            break
        n += 1
    return n


def step_time_ratio(cost: CalibratedCost, records: Sequence, kind: str | None = None) -> float:
    """Measured over predicted step time (host + device), summed over a run's steps (of one
    `kind`, or all): how fast the machine ran compared with the fit, on the same steps."""
    rows = [step_row(r) for r in records if kind is None or r.kind == kind]
    measured = sum(r.before_s + r.device_s + r.after_s for r in rows)
    return measured / max(sum(sum(cost.predict(r)) for r in rows), 1e-12)


# ---------------------------------------------------------------------------
# Error against the measured engine
# ---------------------------------------------------------------------------


def mean_summary(summaries: Sequence[dict]) -> dict:
    """The latency statistics of several runs' summaries (`metrics.summarize`), averaged
    statistic by statistic; `spread` holds each one's (max - min) / mean over the runs."""
    out: dict = {"runs": len(summaries), "spread": {}}
    for metric in ("ttft", "tpot", "itl", "e2e"):
        out[metric], out["spread"][metric] = {}, {}
        for stat in summaries[0][metric]:
            v = np.array([s[metric][stat] for s in summaries], np.float64)
            out[metric][stat] = float(v.mean())
            out["spread"][metric][stat] = float(np.ptp(v) / v.mean()) if v.mean() else 0.0
    return out


def compare(real: dict, sim: dict, targets=TARGETS) -> list[dict]:
    """The simulated summary's latency statistics against the measured one's
    (`metrics.summarize` or `mean_summary` dicts): per (metric, statistic), both values, the
    relative error (sim / real - 1), whether it is within the target, and how much the
    measured runs differed among themselves (`spread`, when several were averaged)."""
    rows = []
    for metric, stat, target in targets:
        r, s = float(real[metric][stat]), float(sim[metric][stat])
        err = s / r - 1 if r else float("inf")
        row = dict(metric=metric, stat=stat, real=r, sim=s, error=err, target=target)
        row["ok"] = abs(err) <= target
        if "spread" in real:
            row["spread"] = real["spread"][metric][stat]
        rows.append(row)
    return rows


def error_table(results: Sequence[dict]) -> str:
    """A markdown table of `compare` rows; each result is {"model", "trace", "rows"}."""
    lines = [
        "| model | trace | statistic | measured ms | runs differ by | simulated ms | error "
        "| target | met |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for res in results:
        for r in res["rows"]:
            spread = f"{100 * r['spread']:.1f}%" if "spread" in r else ""
            lines.append(
                f"| {res['model']} | {res['trace']} | {r['stat']} {r['metric'].upper()} | "
                f"{1e3 * r['real']:.3f} | {spread} | {1e3 * r['sim']:.3f} | "
                f"{100 * r['error']:+.1f}% | {100 * r['target']:.0f}% | "
                f"{'yes' if r['ok'] else 'NO'} |"
            )
    return "\n".join(lines)
