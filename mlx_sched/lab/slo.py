"""SLO attainment, goodput, fairness (Jain index, VTC service difference) from request metrics.

Inputs are `metrics.request_metrics` dicts (plus each request's token times
for service curves). Definitions follow reference/algorithms.md.
"""

from __future__ import annotations

import numpy as np


def meets_slo(r: dict, ttft_slo: float, tpot_slo: float) -> bool:
    return (
        r.get("status") == "finished"
        and r.get("ttft", np.inf) <= ttft_slo
        and (r.get("tpot", 0.0) <= tpot_slo)
    )


def slo_attainment(requests: list[dict], ttft_slo: float, tpot_slo: float) -> float:
    """Share of requests meeting both the TTFT and the TPOT SLO."""
    if not requests:
        return float("nan")
    return sum(meets_slo(r, ttft_slo, tpot_slo) for r in requests) / len(requests)


def goodput(rates: list[float], attainments: list[float], target: float = 0.9) -> float:
    """DistServe's goodput: the highest request rate whose SLO attainment is >= target."""
    ok = [r for r, a in zip(rates, attainments, strict=True) if a >= target]
    return max(ok) if ok else 0.0


def jain_index(values) -> float:
    """(sum x)^2 / (n * sum x^2): 1 when all equal, 1/n when one gets everything."""
    x = np.asarray(list(values), np.float64)
    if len(x) == 0 or not np.any(x):
        return float("nan")
    return float(x.sum() ** 2 / (len(x) * np.sum(x * x)))


def service_events(requests, w_in: float = 1.0, w_out: float = 2.0):
    """(time, client, amount) for every unit of service: prompt at first scheduling, then tokens."""
    events = []
    for r in requests:
        if r.first_scheduled is not None:
            events.append((r.first_scheduled, r.client, w_in * r.prompt_len))
        for s in r.seqs:
            events += [(t, r.client, w_out) for t in s.token_times]
    events.sort(key=lambda e: e[0])
    return events


def service_curves(requests, weights: dict | None = None, w_in=1.0, w_out=2.0, points=400):
    """Per client, cumulative weighted service sampled on a common time grid."""
    weights = weights or {}
    events = service_events(requests, w_in, w_out)
    clients = sorted({r.client for r in requests})
    if not events:
        return np.zeros(0), {c: np.zeros(0) for c in clients}
    t0, t1 = min(r.arrival for r in requests), events[-1][0]
    grid = np.linspace(t0, t1, points)
    curves = {}
    for c in clients:
        ts = np.array([e[0] for e in events if e[1] == c])
        amounts = np.array([e[2] for e in events if e[1] == c]) / weights.get(c, 1.0)
        cum = np.cumsum(amounts) if len(amounts) else np.zeros(0)
        idx = np.searchsorted(ts, grid, side="right") - 1
        curves[c] = np.where(idx >= 0, cum[np.clip(idx, 0, None)] if len(cum) else 0.0, 0.0)
    return grid, curves


def backlog_mask(requests, client: str, grid) -> np.ndarray:
    """True where `client` had a request queued: arrived but not yet scheduled (VTC's backlog)."""
    out = np.zeros(len(grid), bool)
    for r in requests:
        if r.client == client:
            start = r.first_scheduled if r.first_scheduled is not None else np.inf
            out |= (grid >= r.arrival) & (grid < start)
    return out


def backlogged_share(requests, points=400) -> float:
    """Share of the run (first arrival to last token) in which every client had a request
    queued: the regime in which VTC's fairness guarantee, and FCFS's unfairness, show."""
    grid, curves = service_curves(requests, points=points)
    if len(curves) < 2 or len(grid) == 0:
        return 0.0
    return float(np.mean(np.all([backlog_mask(requests, c, grid) for c in curves], axis=0)))


def service_difference(requests, weights=None, w_in=1.0, w_out=2.0, points=400):
    """Max - min weighted service received since all clients became backlogged, over time.

    Within each interval in which every client has a queued request, service is
    counted from the interval's start (VTC's guarantee is about such intervals);
    elsewhere the difference is NaN.
    """
    grid, curves = service_curves(requests, weights, w_in, w_out, points)
    clients = sorted(curves)
    diff = np.full(len(grid), np.nan)
    if len(clients) < 2 or len(grid) == 0:
        return grid, diff
    both = np.all([backlog_mask(requests, c, grid) for c in clients], axis=0)
    stack = np.stack([curves[c] for c in clients])
    start = None
    for i in range(len(grid)):
        if not both[i]:
            start = None
            continue
        if start is None:
            start = i
        since = stack[:, i] - stack[:, start]
        diff[i] = since.max() - since.min()
    return grid, diff


def backlogged_service(requests, weights=None, w_in=1.0, w_out=2.0, points=400) -> dict:
    """Weighted service per client within the longest interval in which all were backlogged."""
    grid, curves = service_curves(requests, weights, w_in, w_out, points)
    clients = sorted(curves)
    if len(grid) == 0:
        return dict.fromkeys(clients, 0.0)
    both = np.all([backlog_mask(requests, c, grid) for c in clients], axis=0)
    best, start, span = (0, 0), None, 0
    for i, b in enumerate([*both, False]):
        if b and start is None:
            start = i
        elif not b and start is not None:
            if i - 1 - start > span:
                span, best = i - 1 - start, (start, i - 1)
            start = None
    lo, hi = best
    return {c: float(curves[c][hi] - curves[c][lo]) for c in clients}
