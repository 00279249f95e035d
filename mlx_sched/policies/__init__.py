"""Scheduling policies: one class per file behind the `Policy` interface.

A policy's `schedule(sched, now)` returns the next `StepPlan`, using the
mechanisms of `mlx_sched.scheduler.Scheduler` (reserve pages, admit, preempt,
swap). Optional hooks let a policy keep its own state (counters, queues).
"""

from __future__ import annotations

from mlx_sched.policies.base import Policy
from mlx_sched.policies.fcfs import FCFS
from models.config import ConfigError

REGISTRY: dict[str, type[Policy]] = {"fcfs": FCFS}


def make_policy(name: str, cfg) -> Policy:
    if name not in REGISTRY:
        raise ConfigError(f"unknown policy '{name}'; known: {sorted(REGISTRY)}")
    return REGISTRY[name](cfg)


__all__ = ["FCFS", "REGISTRY", "Policy", "make_policy"]
