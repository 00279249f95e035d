"""FineInfer's co-serving: one process, one model, fine-tuning steps whenever no request is
due, serving by continuous batching when one is.

    co = CoServer(engine, tuner, batches, CoServeConfig(deferral_s=1.0))
    result = co.run(trace)   # lab.workload.TraceRequest arrivals, relative to the start

The loop, at every step boundary (a tuning step or an engine step):

- serving: the engine steps while it has work (arrivals join the running batch); when the
  batch empties, the router statistics of the traffic just served are logged and tuning
  resumes;
- tuning: a request that has waited `deferral_s` (the oldest waiting one) switches the
  loop to serving: the tuned parameters reach the engine first (`Engine.update_params`: no
  recompilation, no copy of the frozen weights; the prefix cache is cleared), then it
  serves. Otherwise one tuning step runs. `deferral_s=0` is strict time-sharing: serve as
  soon as anything waits.

So no request waits longer than the deferral bound plus one tuning step (plus the update).
`mode="serve_only"` never tunes (the loop sleeps until the next arrival), `"train_only"`
never serves. Every tuning step, update, serving phase and the parameter version each
request was served with is in `result`; `versions[v]` keeps the tuned parameters of every
version that served, so its outputs can be replayed on a fresh engine.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from mlx_sched.serve import metrics as metrics_lib
from mlx_sched.serve.request import SamplingParams, Status
from models.config import ConfigError, check_keys

MODES = ("coserve", "serve_only", "train_only")


@dataclasses.dataclass(frozen=True)
class CoServeConfig:
    deferral_s: float = 1.0  # FineInfer's bound on how long a request waits for tuning to yield
    mode: str = "coserve"
    max_train_steps: int | None = None  # stop tuning after this many steps (None: never)
    train_only_s: float = 10.0  # "train_only": how long to tune
    serve_stats: bool = True  # router statistics of each serving phase's traffic

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"coserve.mode must be one of {MODES}, got '{self.mode}'")
        if not self.deferral_s >= 0:
            raise ConfigError(f"coserve.deferral_s must be >= 0, got {self.deferral_s}")
        if self.max_train_steps is not None and self.max_train_steps < 0:
            raise ConfigError(f"coserve.max_train_steps must be >= 0, got {self.max_train_steps}")
        if not self.train_only_s > 0:
            raise ConfigError(f"coserve.train_only_s must be > 0, got {self.train_only_s}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CoServeConfig:
        check_keys(cls, d, "coserve config")
        return cls(**dict(d))


class CoServer:
    """An `Engine` and a `cotrain.Tuner` of the same model taking turns on one host.

    `batches` yields training batches [B, L + 1]; `sleep` waits (real time by default; a
    simulated clock's advance in tests)."""

    def __init__(
        self,
        engine,
        tuner,
        batches: Iterator[np.ndarray],
        cfg: CoServeConfig | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.engine, self.tuner, self.batches = engine, tuner, batches
        self.cfg = cfg or CoServeConfig()
        self.clock, self.sleep = engine.clock, sleep
        self.served_version = tuner.version  # the engine serves the tuner's initial parameters
        self.versions = {tuner.version: tuner.snapshot()}
        self.train_log: list[dict] = []  # per tuning step: t0, t1, version after, metrics
        self.serve_log: list[dict] = []  # per serving phase: t0, t1, version, steps, stats
        self.updates: list[dict] = []  # per parameter update: t0, t1, version, leaves
        self.request_version: dict[str, int] = {}  # finished request -> version that served it
        self.served: list[dict] = []  # finished requests' metrics (`metrics.request_metrics`)

    # -- decisions ------------------------------------------------------------------------

    def _oldest_wait(self, now: float) -> float | None:
        """How long the oldest waiting request has waited (None: nothing waits)."""
        waiting = self.engine.sched.waiting
        return now - min(r.arrival for r in waiting) if waiting else None

    def _may_train(self) -> bool:
        m = self.cfg.max_train_steps
        return self.cfg.mode != "serve_only" and (m is None or len(self.train_log) < m)

    # -- the loop -------------------------------------------------------------------------

    def run(self, trace: Sequence, sampling: SamplingParams | None = None) -> dict:
        """Serve every request of `trace` (arrivals relative to now; outputs forced to their
        lengths), tuning in between; -> the run's summary (`summary`)."""
        cfg, engine = self.cfg, self.engine
        self._trace, self._base = trace, sampling or SamplingParams()
        if cfg.mode != "serve_only" or cfg.serve_stats:
            self.tuner.warmup()  # before the trace's clock starts, as the engine's own warm-up
        self._start = start = self.clock()
        self._order = sorted(range(len(trace)), key=lambda i: trace[i].arrival)
        self._next = 0
        if cfg.mode == "train_only":
            self._order = []
            while self.clock() - start < cfg.train_only_s and self._may_train():
                self._train_step()
        while self._next < len(self._order) or engine.has_work():
            now = self.clock()
            self._admit(now)
            wait = self._oldest_wait(now)
            if wait is not None and (wait >= cfg.deferral_s or not self._may_train()):
                self._serve_phase()
            elif self._may_train():
                self._train_step()
            elif wait is None and self._next < len(self._order):  # idle until the next arrival
                due = start + trace[self._order[self._next]].arrival
                self.sleep(max(0.0, due - self.clock()))
        return self.summary(self.clock() - start)

    def _admit(self, now: float) -> None:
        """Queue the trace's requests that have arrived by `now`."""
        trace, order = self._trace, self._order
        while self._next < len(order) and self._start + trace[order[self._next]].arrival <= now:
            i = order[self._next]
            r = trace[i]
            sp = dataclasses.replace(
                self._base, max_tokens=r.max_tokens, seed=self._base.seed + i, ignore_eos=True
            )
            self.engine.add_request(
                r.prompt, sp, f"r{i}", r.client, r.priority, self._start + r.arrival
            )
            self._next += 1

    def _train_step(self) -> None:
        t0 = self.clock()
        metrics = self.tuner.step(next(self.batches))
        self.train_log.append(
            {"t0": t0, "t1": self.clock(), "version": self.tuner.version, **metrics}
        )

    def _serve_phase(self) -> None:
        """Bring the engine up to date, then serve until the batch empties."""
        engine, tuner = self.engine, self.tuner
        t0 = self.clock()
        if tuner.version != self.served_version:
            n = engine.update_params(tuner.trainable)
            self.served_version = tuner.version
            self.versions[tuner.version] = tuner.snapshot()
            self.updates.append(
                {"t0": t0, "t1": self.clock(), "version": tuner.version, "leaves": n}
            )
        finished, steps = [], 0
        while engine.has_work():
            for out in engine.step():
                if out.finished:
                    finished.append(out.request)
            steps += 1
            self._admit(self.clock())  # arrivals while serving join the batch
        for req in finished:
            self.request_version[req.id] = self.served_version
            self.served.append(metrics_lib.request_metrics(req))
        phase = {"t0": t0, "t1": self.clock(), "version": self.served_version, "steps": steps}
        phase["requests"] = len(finished)
        if self.cfg.serve_stats:
            phase.update(self._served_stats(finished))
        self.serve_log.append(phase)

    def _served_stats(self, requests) -> dict:
        """Router statistics of the served tokens (prompts and outputs) with the parameters
        that served them, routed as the engine routes (dropless): the sequences are laid end
        to end and cut into the tuner's [batch_size, seq_len + 1] windows (one compiled
        shape; a token near a sequence's start also sees the previous one's tail)."""
        stream = [t for r in requests if r.status is Status.FINISHED for t in r.seqs[0].tokens]
        if not stream:
            return {}
        B, L = self.tuner.cfg.batch_size, self.tuner.cfg.seq_len + 1
        rows = min(B, -(-len(stream) // L))  # windows holding served tokens (the rest: repeats)
        batch = np.resize(np.asarray(stream, np.int32), (B, L))
        m = self.tuner.evaluate(batch, "serve", self.versions[self.served_version])
        return {"serve/windows": rows, **{f"serve/{k}": v for k, v in m.items() if "/" in k}}

    # -- results --------------------------------------------------------------------------

    def summary(self, wall_s: float) -> dict:
        served = metrics_lib.summarize(self.served, [], wall_s) if self.served else {}
        steps = len(self.train_log)
        return {
            "mode": self.cfg.mode,
            "deferral_s": self.cfg.deferral_s,
            "wall_s": wall_s,
            "train_steps": steps,
            "train_steps_per_min": 60.0 * steps / max(wall_s, 1e-9),
            "updates": len(self.updates),
            "serve_phases": len(self.serve_log),
            "serving": served,
        }
