"""Replay a trace through an engine: offline (everything at t=0) or online (real arrival times)."""

from __future__ import annotations

import time

from mlx_sched.lab.workload import TraceRequest
from mlx_sched.serve.request import SamplingParams


def replay(
    engine,
    trace: list[TraceRequest],
    online: bool = True,
    time_scale: float = 1.0,
    sampling: SamplingParams | None = None,
    progress=None,
) -> float:
    """Serve every request of `trace`; returns the wall time from first arrival to last token.

    Online, a request is added once the wall clock passes its arrival time
    (times multiplied by `time_scale`); the engine idles until the next arrival
    when it has nothing to do. Outputs are forced to the trace's length
    (`ignore_eos`), as serving benchmarks do.
    """
    base = sampling or SamplingParams()
    order = sorted(range(len(trace)), key=lambda i: trace[i].arrival)
    t0 = engine.clock()
    nxt, done_steps = 0, 0
    settle = getattr(engine.clock, "settle", None)  # simulated time: the step's host work ends
    while nxt < len(order) or engine.has_work():
        if settle is not None:
            settle()
        now = engine.clock() - t0
        while nxt < len(order) and (not online or trace[order[nxt]].arrival * time_scale <= now):
            r = trace[order[nxt]]
            arrival = t0 + (r.arrival * time_scale if online else 0.0)
            sp = SamplingParams(
                max_tokens=r.max_tokens,
                temperature=base.temperature,
                top_k=base.top_k,
                top_p=base.top_p,
                seed=base.seed + order[nxt],
                ignore_eos=True,
            )
            deadline = None if r.deadline is None else t0 + r.deadline * time_scale
            engine.add_request(
                r.prompt, sp, f"r{order[nxt]}", r.client, r.priority, arrival, deadline
            )
            nxt += 1
        if engine.has_work():
            engine.step()
            done_steps += 1
            if progress and done_steps % 50 == 0:
                progress(nxt, len(order))
        elif nxt < len(order):
            wait = trace[order[nxt]].arrival * time_scale - (engine.clock() - t0)
            if hasattr(engine.clock, "advance_to"):  # simulated time: jump to the arrival
                engine.clock.advance_to(t0 + trace[order[nxt]].arrival * time_scale)
            elif wait > 0:
                time.sleep(min(wait, 0.05))
    return engine.clock() - t0
