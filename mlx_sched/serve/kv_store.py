"""Host copies of sequences' KV pages, keyed by sequence id.

Swap (and later transfer between engines and offload) keeps a sequence's KV
here while it is off the device. The scheduler books an entry when it plans a
swap-out (`expect`, so page counts are known at planning time); the engine
fills it when it executes the transfer (`fill`) and empties it on swap-in
(`take`). Entries of sequences that finish or are aborted are dropped.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class _Entry:
    num_pages: int
    k: np.ndarray | None = None  # [N, pages, Z, K, X] once filled
    v: np.ndarray | None = None


class HostKVStore:
    def __init__(self):
        self._entries: dict[str, _Entry] = {}

    def expect(self, seq_id: str, num_pages: int) -> None:
        """Book an entry for pages a planned swap-out will bring."""
        if seq_id in self._entries:
            raise ValueError(f"sequence {seq_id} already has host KV")
        self._entries[seq_id] = _Entry(num_pages)

    def fill(self, seq_id: str, k: np.ndarray, v: np.ndarray) -> None:
        entry = self._entries[seq_id]
        if k.shape[1] != entry.num_pages:
            raise ValueError(f"{seq_id}: expected {entry.num_pages} pages, got {k.shape[1]}")
        entry.k, entry.v = k, v

    def take(self, seq_id: str) -> tuple[np.ndarray, np.ndarray]:
        entry = self._entries.pop(seq_id)
        if entry.k is None:
            raise ValueError(f"{seq_id}: host KV taken before it was filled")
        return entry.k, entry.v

    def discard(self, seq_id: str) -> None:
        self._entries.pop(seq_id, None)

    def num_pages(self, seq_id: str) -> int:
        entry = self._entries.get(seq_id)
        return 0 if entry is None else entry.num_pages

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e.k.nbytes + e.v.nbytes for e in self._entries.values() if e.k is not None)
