"""The compiled shapes of the engine's steps, and the one function that picks a plan's shape.

- a *mixed* step `(D, L, Tp)`: D decode slots of L positions each (L = 1 + draft
  tokens, a declared `decode_widths` bucket; D = 0: no decode group) plus Tp
  prefill tokens in up to `max_prefill_rows` rows (Tp = 0: no rows, L > 1 only);
- a decode *slice* `(D, S)`: D slots, up to S = `slice_len` iterations in one call.

The device runner and the simulator's runner both call `shape_for(plan, cfg)`,
so a simulated step is charged for the bucket the real one would run in.
"""

from __future__ import annotations

import bisect
import dataclasses

from mlx_sched.serve.config import ServeConfig
from mlx_sched.serve.plan import StepPlan


def bucket(sizes: tuple[int, ...], n: int) -> int:
    """The smallest declared size >= n."""
    i = bisect.bisect_left(sizes, n)
    if i == len(sizes):
        raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")
    return sizes[i]


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str  # "mixed" | "decode" (a decode slice)
    D: int  # decode slots
    L: int = 1  # positions per decode slot (mixed)
    Tp: int = 0  # prefill tokens (mixed)
    S: int = 1  # iterations (slice)

    @property
    def dims(self) -> tuple[int, ...]:
        return (self.D, self.L, self.Tp) if self.kind == "mixed" else (self.D, self.S)


def shape_for(plan: StepPlan, cfg: ServeConfig) -> Shape:
    """The bucket `plan` runs in; a ValueError if it fits none of the declared ones."""
    decodes, prefills = plan.split()
    if len(prefills) > cfg.max_prefill_rows:
        raise ValueError(f"{len(prefills)} prefill rows exceed max_prefill_rows")
    too_long = [n for _, n in prefills if n > cfg.chunk_tokens]
    if too_long:
        raise ValueError(f"prefill chunks {too_long} exceed the chunk of {cfg.chunk_tokens}")
    width = max((n for _, n in decodes), default=1)
    if not prefills and (plan.as_slice or width == 1):
        if width > cfg.slice_len:
            raise ValueError(f"a slice entry of {width} iterations exceeds slice_len")
        return _shape("decode", bucket(cfg.decode_sizes, len(decodes)), 1, 0, cfg.slice_len)
    if plan.as_slice:
        raise ValueError("a decode slice cannot carry prefill chunks")
    D = bucket(cfg.mixed_decode_sizes, len(decodes)) if decodes else 0
    L = bucket(cfg.decode_widths, width)
    Tp = bucket(cfg.prefill_sizes, sum(n for _, n in prefills)) if prefills else 0
    return _shape("mixed", D, L, Tp, 1)


_SHAPES: dict[tuple, Shape] = {}  # shapes are immutable values: one object per shape


def _shape(kind: str, D: int, L: int, Tp: int, S: int) -> Shape:
    key = (kind, D, L, Tp, S)
    shape = _SHAPES.get(key)
    if shape is None:
        shape = _SHAPES[key] = Shape(kind, D, L, Tp, S)
    return shape


def all_shapes(cfg: ServeConfig) -> list[Shape]:
    """Every shape `shape_for` can return: what warm-up compiles."""
    out = []
    for L in cfg.decode_widths:
        decode_slots = (0, *cfg.mixed_decode_sizes) if L == 1 else cfg.mixed_decode_sizes
        prefill = cfg.prefill_sizes if L == 1 else (0, *cfg.prefill_sizes)
        out += [Shape("mixed", D, L, Tp) for D in decode_slots for Tp in prefill]
    out += [Shape("decode", D, S=cfg.slice_len) for D in cfg.decode_sizes]
    return out
