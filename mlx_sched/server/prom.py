"""`/metrics`: the engine's state in Prometheus' text format.

A scrape asks the engine thread for a snapshot (taken between two steps, so it is
consistent) and turns it into metric families: queue lengths, running sequences,
KV pages, the prefix cache, token and preemption counters, compilations after
warm-up, and the TTFT / TPOT / E2E histograms the engine already keeps of every
request it retired (`metrics.Totals`). HTTP answers by endpoint and status code are
counted where they are made (`http_requests`).
"""

from __future__ import annotations

import copy
import dataclasses

import prometheus_client
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from mlx_sched.serve.engine import Engine
from mlx_sched.serve.metrics import Histogram, Totals
from mlx_sched.server.engine_thread import EngineThread

PREFIX = "mlx_sched"
SNAPSHOT_TIMEOUT_S = 30.0


@dataclasses.dataclass
class Snapshot:
    waiting: int
    running: int
    swapped: int
    running_seqs: int
    pages_in_use: int
    pages_total: int
    prefix_hits: int
    prefix_queries: int
    preemptions: int
    compiles_after_warmup: int
    totals: Totals


def snapshot(engine: Engine) -> Snapshot:
    """The engine's state now (call on the engine thread)."""
    sched, stats = engine.sched, engine.pool.stats()
    live = [*sched.running, *sched.waiting, *sched.swapped]
    return Snapshot(
        waiting=len(sched.waiting),
        running=len(sched.running),
        swapped=len(sched.swapped),
        running_seqs=sched.num_running_seqs,
        pages_in_use=stats.in_use,
        pages_total=stats.num_pages - 1,  # page 0 is the null page
        prefix_hits=stats.prefix_hits,
        prefix_queries=stats.prefix_queries,
        preemptions=engine.totals.preemptions + sum(r.preemptions for r in live),
        compiles_after_warmup=engine.runner.compiles_since_warmup,
        totals=copy.deepcopy(engine.totals),
    )


def _histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    buckets, total = [], 0
    for bound, count in zip(h.bounds, h.counts, strict=False):
        total += count
        buckets.append((repr(float(bound)), total))
    buckets.append(("+Inf", h.n))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h.total)


class EngineCollector(Collector):
    def __init__(self, thread: EngineThread):
        self.thread = thread
        self._last: Snapshot | None = None

    def collect(self):
        if self.thread.alive:
            self._last = self.thread.call(snapshot).result(timeout=SNAPSHOT_TIMEOUT_S)
        s, t = self._last, self.thread
        p = PREFIX
        up = GaugeMetricFamily(f"{p}_engine_up", "1 while the engine thread serves")
        up.add_metric([], 1.0 if t.alive and not t.draining else 0.0)
        yield up
        if s is None:
            return

        def gauge(name, doc, value):
            g = GaugeMetricFamily(f"{p}_{name}", doc)
            g.add_metric([], float(value))
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(f"{p}_{name}", doc)
            c.add_metric([], float(value))
            return c

        yield gauge(
            "requests_waiting",
            "requests not yet admitted (queued at the server or waiting in the engine)",
            t.waiting,
        )
        yield gauge("requests_running", "requests admitted and running", s.running)
        yield gauge("requests_swapped", "requests preempted to host memory", s.swapped)
        yield gauge("sequences_running", "running sequences (decode slots in use)", s.running_seqs)
        yield gauge("kv_pages_in_use", "KV pages held by sequences", s.pages_in_use)
        yield gauge("kv_pages_total", "KV pages in the pool (without the null page)", s.pages_total)
        yield gauge(
            "prefix_cache_hit_rate",
            "share of prefix-cache lookups that found a cached page",
            s.prefix_hits / s.prefix_queries if s.prefix_queries else 0.0,
        )
        yield counter("prefix_cache_hits", "prefix-cache lookups that hit", s.prefix_hits)
        yield counter("prefix_cache_queries", "prefix-cache lookups", s.prefix_queries)
        req = CounterMetricFamily(
            f"{p}_requests", "requests the engine retired, by status", labels=["status"]
        )
        req.add_metric(["finished"], float(s.totals.finished))
        req.add_metric(["aborted"], float(s.totals.aborted))
        yield req
        yield counter("prompt_tokens", "prompt tokens of accepted requests", t.prompt_tokens)
        yield counter("generation_tokens", "tokens generated", t.generated_tokens)
        yield counter("preemptions", "preemptions (recompute or swap)", s.preemptions)
        yield counter("engine_steps", "engine steps run", t.steps)
        yield gauge(
            "compilations_after_warmup",
            "XLA compilations since warm-up (0 when every shape was compiled ahead)",
            s.compiles_after_warmup,
        )
        for key, doc in (
            ("ttft", "time to first token"),
            ("tpot", "time per output token after the first"),
            ("e2e", "arrival to last token"),
        ):
            yield _histogram(f"{p}_{key}_seconds", f"{doc}, seconds", getattr(s.totals, key))


def make_registry(thread: EngineThread) -> tuple[prometheus_client.CollectorRegistry, object]:
    """A registry with the engine collector and the HTTP answers counter."""
    registry = prometheus_client.CollectorRegistry()
    registry.register(EngineCollector(thread))
    http = prometheus_client.Counter(
        f"{PREFIX}_http_requests",
        "HTTP answers by endpoint and status code",
        ["endpoint", "code"],
        registry=registry,
    )
    return registry, http
