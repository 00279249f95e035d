"""The device side of the adapter pool: writing one adapter into its KV pages (S-LoRA's
unified paging, `models/lora_pool.py`) and the per-slot tables every step reads.

A load packs the adapter's rank rows into the cache's page layout on the host and writes
them with the runner's KV page write (the program swap-in uses, compiled at warm-up for the
pages of a max-rank adapter): one host -> device transfer of about the adapter's bytes.
The tables (each slot's pages, rank and scale) are small host arrays sent with every step.
"""

from __future__ import annotations

import jax
import numpy as np

from models import lora_pool


class PageSlots:
    """Adapter slots whose weights live in KV pages of `runner.k` / `runner.v`."""

    def __init__(self, runner, slots: int, layout: lora_pool.PoolLayout):
        self.runner, self.layout = runner, layout
        self.pages = np.zeros((slots + 1, layout.max_pages), np.int32)  # padding: null page
        self.rank = np.zeros(slots + 1, np.int32)
        self.scale = np.zeros(slots + 1, np.float32)

    def write(self, slot: int, pages: list[int], weights: dict, scale: float, rank: int) -> None:
        """Slot `slot` := the adapter `weights` ((layer, target) -> (A, B) at `rank`), written
        into `pages` (at least `layout.pages(rank)` of them)."""
        if len(pages) < self.layout.pages(rank) or len(pages) > self.layout.max_pages:
            raise ValueError(f"rank {rank} needs {self.layout.pages(rank)} pages, got {len(pages)}")
        r = self.runner
        k_data, v_data = lora_pool.pack_adapter(self.layout, weights, rank, r.k.dtype)
        idx = np.zeros(self.layout.max_pages, np.int32)
        idx[: len(pages)] = pages  # the padding writes zeros (rows past the rank) to page 0
        args = jax.device_put((idx, k_data, v_data), r.repl)
        with r._counting(), jax.set_mesh(r.mesh):
            r.k, r.v = r._write(r.k, r.v, *args)
        self.pages[slot], self.rank[slot], self.scale[slot] = idx, rank, scale

    def clear(self, slot: int) -> None:
        """The slot adds nothing (its pages may now hold KV)."""
        self.pages[slot], self.rank[slot], self.scale[slot] = 0, 0, 0.0

    def tables(self) -> dict:
        """The step's copies (a step in flight keeps its own)."""
        return {
            "ad_pages": self.pages.copy(),
            "ad_rank": self.rank.copy(),
            "ad_scale": self.scale.copy(),
        }

    def warmup(self) -> None:
        """Compile the write (zeros into the null page; slot 0 stays the null slot)."""
        self.write(0, [], {}, 0.0, 0)
