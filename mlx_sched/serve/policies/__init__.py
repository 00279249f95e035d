"""Scheduling policies: one class per file behind the `Policy` interface.

A policy's `schedule(sched, now)` returns the next `StepPlan`, using the
mechanisms of `mlx_sched.scheduler.Scheduler` (reserve pages, admit, preempt,
swap). Optional hooks let a policy keep its own state (counters, queues).
"""

from __future__ import annotations

from mlx_sched.serve.policies.base import Policy
from mlx_sched.serve.policies.fcfs import FCFS
from mlx_sched.serve.policies.mlfq import MLFQ
from mlx_sched.serve.policies.priority import Priority
from mlx_sched.serve.policies.sarathi import Sarathi
from mlx_sched.serve.policies.slice import SliceLevel
from mlx_sched.serve.policies.static import Static
from mlx_sched.serve.policies.vtc import VTC
from models.errors import ConfigError

REGISTRY: dict[str, type[Policy]] = {
    p.name: p for p in (FCFS, Static, Sarathi, MLFQ, VTC, SliceLevel, Priority)
}


def make_policy(name: str, cfg) -> Policy:
    if name not in REGISTRY:
        raise ConfigError(f"unknown policy '{name}'; known: {sorted(REGISTRY)}")
    return REGISTRY[name](cfg)


__all__ = [
    "FCFS",
    "MLFQ",
    "REGISTRY",
    "VTC",
    "Policy",
    "Priority",
    "Sarathi",
    "SliceLevel",
    "Static",
    "make_policy",
]
