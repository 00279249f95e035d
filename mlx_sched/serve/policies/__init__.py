"""Scheduling policies: one class per file behind the `Policy` interface, registered by name.

A policy's `schedule(sched, now)` returns the next `StepPlan`, using the
mechanisms of `mlx_sched.serve.scheduler.Scheduler` (reserve pages, admit,
preempt, swap). Each module of this package that defines a policy decorates
it with `@register`; `make_policy` imports them all, so adding a policy is one
new file here (plus its test and config).
"""

from __future__ import annotations

import importlib
import pkgutil

from mlx_sched.serve.policies.base import REGISTRY, Policy, register
from models.errors import ConfigError


def _import_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def make_policy(name: str, cfg) -> Policy:
    _import_all()
    if name not in REGISTRY:
        raise ConfigError(f"unknown policy '{name}'; known: {sorted(REGISTRY)}")
    return REGISTRY[name](cfg)


def names() -> list[str]:
    """Every registered policy's name."""
    _import_all()
    return sorted(REGISTRY)


__all__ = ["REGISTRY", "Policy", "make_policy", "names", "register"]
