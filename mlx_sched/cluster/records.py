"""What the global scheduler keeps of a request, and what a step returns of it."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from mlx_sched.cluster.backends import gather
from mlx_sched.serve import metrics as metrics_lib
from mlx_sched.serve.request import SamplingParams


@dataclasses.dataclass
class ClusterRequest:
    id: str
    prompt: list[int]
    sampling: SamplingParams
    client: str
    priority: int
    arrival: float
    deadline: float | None
    instance: int = -1
    outputs: list[list[int]] = dataclasses.field(default_factory=list)
    times: list[list[float]] = dataclasses.field(default_factory=list)
    finish_reasons: list[str | None] = dataclasses.field(default_factory=list)
    finished: bool = False
    status: str = "running"  # then "finished" / "aborted"
    skip: list[int] = dataclasses.field(default_factory=list)  # tokens to drop after a restart
    restarts: int = 0
    migrations: int = 0
    preemptions: int = 0
    error: str | None = None
    phase: str = "prefill"  # disaggregated: "prefill" -> "handover" -> "decode"

    def metrics(self, itl: bool = True) -> dict:
        """Latency metrics (ITLs pooled over the sequences; `itl=False` leaves them out)."""
        out = {
            "id": self.id,
            "client": self.client,
            "priority": self.priority,
            "prompt_len": len(self.prompt),
            "status": self.status,
            "preemptions": self.preemptions,
            "migrations": self.migrations,
            "restarts": self.restarts,
            "output_len": sum(map(len, self.outputs)),
        }
        times = [t for t in self.times if t]
        if times:
            first, last = min(t[0] for t in times), max(t[-1] for t in times)
            t0 = times[0]
            out |= {
                "ttft": first - self.arrival,
                "e2e": last - self.arrival,
                "tpot": (t0[-1] - t0[0]) / (len(t0) - 1) if len(t0) > 1 else 0.0,
                "normalized_latency": (last - self.arrival) / max(1, out["output_len"]),
            }
            if itl:
                out["itl"] = [b - a for t in times for a, b in zip(t[:-1], t[1:], strict=True)]
        return out


def pooled_itl(requests: list[ClusterRequest], chunk: int = 4096) -> np.ndarray:
    """Every inter-token gap of `requests`, in the order `metrics()["itl"]` lists them, one
    request after another: the same float64 differences, in one array (filled a chunk of
    requests at a time) instead of a list per request."""
    out = np.empty(sum(len(t) - 1 for r in requests for t in r.times if t), np.float64)
    at = 0
    for k in range(0, len(requests), chunk):
        seqs = [t for r in requests[k : k + chunk] for t in r.times if len(t) > 1]
        if not seqs:
            continue
        lens = np.fromiter(map(len, seqs), np.int64, len(seqs))
        flat = np.fromiter(itertools.chain.from_iterable(seqs), np.float64, int(lens.sum()))
        gaps = np.delete(np.diff(flat), np.cumsum(lens)[:-1] - 1)  # not across sequences
        out[at : at + len(gaps)] = gaps
        at += len(gaps)
    return out


@dataclasses.dataclass
class ClusterOutput:
    request_id: str
    new_tokens: list[list[int]]
    finished: bool
    request: ClusterRequest = dataclasses.field(repr=False)

    @property
    def outputs(self) -> list[list[int]]:
        return self.request.outputs

    @property
    def finish_reasons(self) -> list[str | None]:
        return self.request.finish_reasons


class Reports:
    """Metrics and checks of `cluster.Cluster` (a mixin over its requests, moves, instances)."""

    def request_metrics(self) -> list[dict]:
        return [r.metrics() for r in self.requests.values()]

    def summary(self, wall_s: float) -> dict:
        reqs = list(self.requests.values())
        metrics = [r.metrics(itl=False) for r in reqs]
        itl = pooled_itl(
            [r for r, m in zip(reqs, metrics, strict=True) if m["status"] == "finished"]
        )
        out = metrics_lib.summarize(metrics, [], wall_s, itl)
        moves = [m for m in self.move_log if m["outcome"] == "done"]
        migrations = [m for m in moves if m["kind"] == "migration"]
        out |= {
            "instances": len(self.instances),
            "dead": sorted(self.dead),
            "migrations": len(migrations),
            "migration_downtime": metrics_lib.percentiles([m["downtime"] for m in migrations]),
            "handovers": sum(m["kind"] == "handover" for m in moves),
            "moves_aborted": sum(m["outcome"].startswith("aborted") for m in self.move_log),
            "kv_bytes_moved": sum(m["bytes"] for m in self.move_log),
            "kv_seconds": sum(m["seconds"] for m in self.move_log),
            "compiles_after_warmup": list(self.compiles),
            "restarts": sum(r.restarts for r in self.requests.values()),
        }
        return out

    def check(self) -> None:
        """Every live instance's page pool is consistent (tests)."""
        live = [i for i in range(len(self.instances)) if i not in self.dead]
        for i, err in zip(
            live, gather([self.instances[i].call("check") for i in live]), strict=True
        ):
            if isinstance(err, BaseException):
                raise AssertionError(f"instance {i}: {err}")
