"""Dispatch policies: which instance a new request goes to.

A policy sees each candidate instance's last `Load` (updated locally as requests are
dispatched between reports) and returns an index into the candidates:

- `round_robin`: in turn;
- `least_loaded`: the fewest running + waiting sequences, then the most free pages;
- `llumnix`: the highest freeness (Llumnix: (free pages - head-of-line demand) /
  (running + [waiting > 0])), with headroom kept for high-priority requests.
"""

from __future__ import annotations

import itertools

from mlx_sched.cluster.instance import Load

REGISTRY: dict[str, type] = {}


def register(cls):
    REGISTRY[cls.name] = cls
    return cls


class Dispatch:
    name = "base"

    def choose(self, loads: list[Load], prompt_pages: int, priority: int = 0) -> int:
        raise NotImplementedError


@register
class RoundRobin(Dispatch):
    name = "round_robin"

    def __init__(self, **_):
        self._turn = itertools.count()

    def choose(self, loads, prompt_pages, priority=0):
        return next(self._turn) % len(loads)


@register
class LeastLoaded(Dispatch):
    name = "least_loaded"

    def __init__(self, **_):
        pass

    def choose(self, loads, prompt_pages, priority=0):
        return min(
            range(len(loads)),
            key=lambda i: (loads[i].running + loads[i].waiting, -loads[i].free_pages, i),
        )


@register
class Llumnix(Dispatch):
    """The freest instance; a high-priority request counts the headroom its peers keep."""

    name = "llumnix"

    def __init__(self, headroom_pages: int = 0, **_):
        self.headroom = headroom_pages

    def choose(self, loads, prompt_pages, priority=0):
        return max(
            range(len(loads)),
            key=lambda i: (loads[i].freeness(self.headroom), loads[i].free_pages, -i),
        )


def make_dispatch(name: str, **kwargs) -> Dispatch:
    if name not in REGISTRY:
        from mlx_sched.cluster.backends import ClusterError

        raise ClusterError(f"unknown dispatch policy '{name}'; known: {sorted(REGISTRY)}")
    return REGISTRY[name](**kwargs)
