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
from collections.abc import Sequence

import numpy as np

from mlx_sched.lab.step_cost import (
    KINDS,
    MIN_WINDOW_STEPS,
    NOISE_QUANTILES,
    NOISE_WINDOW_S,
    CalibratedCost,
    StepRow,
    step_row,
)

# (metric, statistic, largest relative error allowed)
TARGETS = (
    ("ttft", "mean", 0.05),
    ("tpot", "mean", 0.05),
    ("ttft", "p90", 0.10),
    ("tpot", "p90", 0.10),
)

# ---------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------


def nnls(X, y, w=None) -> np.ndarray:
    """Least squares with non-negative coefficients (optionally row weights `w`) whose fitted
    values add up to y's (weighted) total: solve, drop the most negative column, repeat. With
    an intercept the least-squares fit keeps the total by itself; once a column is dropped, a
    constraint keeps it, so a simulator on the fit spends the measured time in all. Columns
    are scaled first, so units do not matter."""
    X, y = np.asarray(X, np.float64), np.asarray(y, np.float64)
    if w is not None:
        w = np.asarray(w, np.float64)
        total, sums = float(w @ y), w @ X
        X, y = X * np.sqrt(w)[:, None], y * np.sqrt(w)
    else:
        total, sums = float(y.sum()), X.sum(axis=0)
    coef = np.zeros(X.shape[1])
    keep = np.abs(X).max(axis=0) > 0 if len(X) else np.zeros(X.shape[1], bool)
    while keep.any():
        scale = np.abs(X[:, keep]).max(axis=0)
        A, s = X[:, keep] / scale, sums[keep] / scale
        # the KKT system of min |A c - y|^2 subject to s.c = total
        n = A.shape[1]
        kkt = np.zeros((n + 1, n + 1))
        kkt[:n, :n], kkt[:n, n], kkt[n, :n] = A.T @ A, s, s
        c = np.linalg.lstsq(kkt, np.append(A.T @ y, total), rcond=None)[0][:n] / scale
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
