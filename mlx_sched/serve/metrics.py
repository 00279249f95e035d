"""Serving metrics: per request (TTFT, TPOT, ITL, E2E, scheduling delay, preemptions),
per step (composition, bucket, KV use, host vs device time), and summaries.

Definitions follow reference/algorithms.md: TTFT = first token - arrival;
TPOT = (last - first) / (n_out - 1); ITL = every gap between a sequence's
tokens, pooled; E2E = last token - arrival; normalized latency = E2E / n_out;
scheduling delay = first scheduled - arrival.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
import pathlib

import numpy as np

from mlx_sched.serve.request import Request

PERCENTILES = (50, 90, 99)


@dataclasses.dataclass
class StepRecord:
    t: float  # wall time at the end of the step
    kind: str  # "mixed" | "decode"
    shape: tuple  # compiled bucket: (D, Tp) or (D, S)
    num_decode: int
    num_prefill_tokens: int
    num_prefill_seqs: int
    decode_ctx: int  # summed context length of the decoding sequences (attention reads)
    prefill_attn: int  # sum over prefill chunks of n * (start + n) (attention pairs)
    iters: int  # decode iterations run (a slice may stop early)
    new_tokens: int
    running: int
    waiting: int
    pages_in_use: int
    live_tokens: int  # tokens whose KV the running sequences hold
    host_s: float  # schedule + batch building + postprocess
    device_s: float  # dispatch -> results back
    page_size: int
    spec_proposed: int = 0  # speculative decoding: draft tokens verified this step
    spec_accepted: int = 0  # of which the target kept
    draft_s: float = 0.0  # seconds the drafter took (within host_s)
    post_s: float = 0.0  # of host_s, the postprocess after the step's tokens were stamped

    @property
    def kv_live_fraction(self) -> float:
        """Share of allocated KV slots holding a live token."""
        return self.live_tokens / max(1, self.pages_in_use * self.page_size)


def request_metrics(req: Request, itl: bool = True) -> dict:
    """Latency metrics of one finished request (first sequence for TTFT/TPOT; ITL pooled;
    `itl=False` leaves the per-token gaps out, for aggregates that do not read them)."""
    times = [s.token_times for s in req.seqs if s.token_times]
    out: dict = {
        "id": req.id,
        "client": req.client,
        "priority": req.priority,
        "prompt_len": req.prompt_len,
        "status": req.status.value,
        "preemptions": req.preemptions,
    }
    p = req.prompt_len
    n_out = sum(max(0, len(s.tokens) - p) for s in req.seqs)  # len(s.output), not copied
    out["output_len"] = n_out
    proposed = sum(s.spec_proposed for s in req.seqs)
    if proposed:
        out["spec_proposed"] = proposed
        out["spec_accepted"] = sum(s.spec_accepted for s in req.seqs)
        out["spec_acceptance"] = out["spec_accepted"] / proposed
    if not times:
        return out
    first = min(t[0] for t in times)
    last = max(t[-1] for t in times)
    out["ttft"] = first - req.arrival
    out["e2e"] = last - req.arrival
    t0 = times[0]
    out["tpot"] = (t0[-1] - t0[0]) / (len(t0) - 1) if len(t0) > 1 else 0.0
    if itl:
        out["itl"] = [b - a for t in times for a, b in itertools.pairwise(t)]
    out["normalized_latency"] = out["e2e"] / max(1, n_out)
    if req.first_scheduled is not None:
        out["scheduling_delay"] = req.first_scheduled - req.arrival
    return out


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclasses.dataclass
class Histogram:
    """Counts of observations at or below each bucket bound (the last bucket is +inf)."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = dataclasses.field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self):
        self.counts = self.counts or [0] * (len(self.bounds) + 1)

    def observe(self, x: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, x)] += 1
        self.total += x
        self.n += 1


@dataclasses.dataclass
class Totals:
    """Bounded aggregates of every request an engine has retired, however long it runs."""

    finished: int = 0
    aborted: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    preemptions: int = 0
    ttft: Histogram = dataclasses.field(default_factory=Histogram)
    tpot: Histogram = dataclasses.field(default_factory=Histogram)
    e2e: Histogram = dataclasses.field(default_factory=Histogram)

    def observe(self, m: dict) -> None:
        """Add one request's `request_metrics`."""
        if m["status"] == "finished":
            self.finished += 1
        else:
            self.aborted += 1
        self.prompt_tokens += m["prompt_len"]
        self.output_tokens += m["output_len"]
        self.preemptions += m["preemptions"]
        for key in ("ttft", "tpot", "e2e"):
            if key in m:
                getattr(self, key).observe(m[key])


def percentiles(values, ps=PERCENTILES) -> dict:
    if len(values) == 0:
        return {f"p{p}": float("nan") for p in ps} | {"mean": float("nan")}
    arr = np.asarray(values, np.float64)
    return {f"p{p}": float(np.percentile(arr, p)) for p in ps} | {"mean": float(arr.mean())}


def summarize(
    requests: list[dict], steps: list[StepRecord], wall_s: float, itl: np.ndarray | None = None
) -> dict:
    """Aggregate request and step metrics into one JSON-able summary. `itl`: the finished
    requests' pooled ITLs, in their order, when the request metrics leave them out."""
    done = [r for r in requests if r["status"] == "finished"]
    out_tokens = sum(r["output_len"] for r in done)
    prompt_tokens = sum(r["prompt_len"] for r in done)
    host = sum(s.host_s for s in steps)
    device = sum(s.device_s for s in steps)
    decode_steps = [s for s in steps if s.kind == "decode"]
    peak = max((s.running for s in steps), default=0)
    return {
        "requests": len(requests),
        "finished": len(done),
        "wall_s": wall_s,
        "output_tokens": out_tokens,
        "prompt_tokens": prompt_tokens,
        "output_tok_s": out_tokens / wall_s if wall_s else float("nan"),
        "total_tok_s": (out_tokens + prompt_tokens) / wall_s if wall_s else float("nan"),
        "ttft": percentiles([r["ttft"] for r in done if "ttft" in r]),
        "tpot": percentiles([r["tpot"] for r in done if "tpot" in r]),
        "itl": percentiles([x for r in done for x in r.get("itl", [])] if itl is None else itl),
        "e2e": percentiles([r["e2e"] for r in done if "e2e" in r]),
        "normalized_latency": percentiles([r["normalized_latency"] for r in done if "e2e" in r]),
        "scheduling_delay": percentiles([r.get("scheduling_delay", 0.0) for r in done]),
        "preemptions": sum(r["preemptions"] for r in requests),
        "steps": len(steps),
        "decode_steps": len(decode_steps),
        "decode_tok_s": sum(s.new_tokens for s in decode_steps)
        / max(1e-12, sum(s.host_s + s.device_s for s in decode_steps)),
        "host_s": host,
        "device_s": device,
        "host_share": _host_share(steps),
        "peak_running": peak,
        "host_share_at_peak": _host_share([s for s in steps if s.running == peak]),
        "kv_live_fraction": percentiles([s.kv_live_fraction for s in steps if s.pages_in_use]),
        "buckets": _bucket_counts(steps),
        **_speculation(steps),
    }


def _speculation(steps: list[StepRecord]) -> dict:
    """Speculative decoding over the steps that verified drafts ({} when none did): drafts
    proposed and accepted, tokens per verifying sequence, verify (device) and draft seconds."""
    verify = [s for s in steps if s.spec_proposed]
    if not verify:
        return {}
    proposed = sum(s.spec_proposed for s in verify)
    accepted = sum(s.spec_accepted for s in verify)
    return {
        "speculative": {
            "verify_steps": len(verify),
            "proposed": proposed,
            "accepted": accepted,
            "acceptance": accepted / proposed,
            "tokens_per_verify": sum(s.new_tokens for s in verify)
            / max(1, sum(s.num_decode for s in verify)),
            "verify_s": sum(s.device_s for s in verify),
            "draft_s": sum(s.draft_s for s in steps),
        }
    }


def _host_share(steps: list[StepRecord]) -> float:
    """Host (schedule + build + postprocess) share of the steps' host + device time."""
    host = sum(s.host_s for s in steps)
    return host / max(1e-12, host + sum(s.device_s for s in steps))


def _bucket_counts(steps: list[StepRecord]) -> dict:
    counts: dict[str, int] = {}
    for s in steps:
        key = f"{s.kind}{list(s.shape)}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def write_json(path: str | pathlib.Path, obj) -> None:
    pathlib.Path(path).write_text(json.dumps(obj, indent=2, default=_jsonable))


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    raise TypeError(type(x))


def format_table(summary: dict) -> str:
    """A human-readable table of the headline numbers."""
    rows = [
        ("requests finished", f"{summary['finished']}/{summary['requests']}"),
        ("throughput (output tok/s)", f"{summary['output_tok_s']:.1f}"),
        ("throughput (prompt+output tok/s)", f"{summary['total_tok_s']:.1f}"),
    ]
    for key in ("ttft", "tpot", "itl", "e2e", "scheduling_delay"):
        p = summary[key]
        ms = " / ".join(f"{1e3 * p[q]:.1f}" for q in ("p50", "p90", "p99"))
        rows.append((f"{key} p50 / p90 / p99 (ms)", ms))
    rows += [
        ("preemptions", str(summary["preemptions"])),
        ("steps (decode slices)", f"{summary['steps']} ({summary['decode_steps']})"),
        ("host share of step time", f"{100 * summary['host_share']:.1f}%"),
        (
            f"host share at peak ({summary['peak_running']} running)",
            f"{100 * summary['host_share_at_peak']:.1f}%",
        ),
        ("KV slots holding live tokens (p50)", f"{100 * summary['kv_live_fraction']['p50']:.1f}%"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
