"""Host-side page pool over the device KV arrays: allocation, refcounts, copy-on-write, caching.

Page 0 is the null page: padding reads and writes land there and it is never
allocated. A page is in exactly one of three states:

- in use: refcount > 0 (shared pages have refcount > 1);
- cached: refcount == 0 but holding a full page whose hash chain is known,
  kept in LRU order and reusable by a later request with the same prefix;
- free: refcount == 0, no content worth keeping.

Allocation takes free pages first, then evicts the least recently used
cached page. Full pages are keyed by a hash chain
`hash((parent_hash, tokens, extra))`, so a page is reused only when its
whole prefix matches (as in vLLM v1).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import numpy as np

NULL_PAGE = 0


class OutOfPages(RuntimeError):
    """Not enough free or evictable pages; the scheduler should preempt or wait."""


def page_hash(parent: int | None, tokens: Sequence[int], extra: object = None) -> int:
    return hash((parent, tuple(tokens), extra))


def hash_chain(tokens: Sequence[int], page_size: int, extra: object = None) -> list[int]:
    """Hashes of every full page of `tokens`, each chained on its predecessor."""
    out, parent = [], None
    for i in range(len(tokens) // page_size):
        parent = page_hash(parent, tokens[i * page_size : (i + 1) * page_size], extra)
        out.append(parent)
    return out


@dataclasses.dataclass
class PoolStats:
    num_pages: int
    in_use: int
    cached: int
    free: int
    prefix_hits: int
    prefix_queries: int
    evictions: int
    cow_copies: int

    @property
    def usage(self) -> float:
        return self.in_use / max(1, self.num_pages - 1)


class PagePool:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is the null page), got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.num_pages, self.page_size = num_pages, page_size
        self.refcount = np.zeros(num_pages, np.int32)
        self._free: collections.deque[int] = collections.deque(range(1, num_pages))
        self._cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU
        self._hash_of: dict[int, int] = {}  # page -> hash, for full pages with known content
        self._page_of: dict[int, int] = {}  # hash -> page
        self.prefix_hits = self.prefix_queries = self.evictions = self.cow_copies = 0
        # what holds pages it gives back on demand (`reclaimable`, `reclaim(n)`): the idle
        # LoRA adapters of unified paging (serve/adapters.py); None: nothing
        self.reclaimer = None

    # -- capacity --------------------------------------------------------------

    @property
    def num_available(self) -> int:
        """Pages an allocation could obtain now (free + evictable cached + reclaimable)."""
        n = len(self._free) + len(self._cached)
        return n if self.reclaimer is None else n + self.reclaimer.reclaimable

    @property
    def num_in_use(self) -> int:
        return self.num_pages - 1 - len(self._free) - len(self._cached)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    # -- allocation ------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """n pages with refcount 1, or OutOfPages (and nothing allocated)."""
        if n > self.num_available:
            raise OutOfPages(f"need {n} pages, {self.num_available} available")
        short = n - len(self._free) - len(self._cached)
        if short > 0:
            self.reclaimer.reclaim(short)
        out = []
        for _ in range(n):
            if self._free:
                page = self._free.popleft()
            else:
                page, _ = self._cached.popitem(last=False)  # least recently used
                self._forget(page)
                self.evictions += 1
            self.refcount[page] = 1
            out.append(page)
        return out

    def incref(self, page: int) -> None:
        if page == NULL_PAGE:
            raise ValueError("the null page is never shared")
        if self.refcount[page] == 0:
            if page not in self._cached:
                raise ValueError(f"page {page} is free; incref needs a live or cached page")
            del self._cached[page]
        self.refcount[page] += 1

    def free(self, pages: Sequence[int]) -> None:
        """Drop one reference to each page, tail first (so a prefix's head stays cached longest)."""
        refcount = self.refcount
        for page in reversed(list(pages)):
            if page == NULL_PAGE:
                continue
            count = refcount[page]
            if count <= 0:
                raise ValueError(f"double free of page {page}")
            refcount[page] = count - 1
            if count == 1:
                if page in self._hash_of:
                    self._cached[page] = None  # most recently used at the end
                else:
                    self._free.append(page)

    def _forget(self, page: int) -> None:
        h = self._hash_of.pop(page, None)
        if h is not None and self._page_of.get(h) == page:
            del self._page_of[h]

    # -- copy-on-write -----------------------------------------------------------

    def writable(self, page: int) -> tuple[int, tuple[int, int] | None]:
        """A page safe to write: the page itself if unshared, else a fresh copy.

        Returns (page, copy) where copy is (src, dst) for the device to copy, or None.
        Writing changes a page's content, so a written page leaves the prefix cache.
        """
        if self.refcount[page] == 1:
            self._forget(page)
            return page, None
        (new,) = self.allocate(1)
        self.refcount[page] -= 1  # still >= 1: others keep it
        self.cow_copies += 1
        return new, (page, new)

    # -- prefix cache ------------------------------------------------------------

    def lookup(self, hashes: Sequence[int]) -> list[int]:
        """Pages holding the longest cached prefix of `hashes`; each gains a reference."""
        pages = []
        for h in hashes:
            self.prefix_queries += 1
            page = self._page_of.get(h)
            if page is None:
                break
            self.prefix_hits += 1
            self.incref(page)
            pages.append(page)
        return pages

    def register(self, page: int, h: int) -> None:
        """Record that `page` holds the full page with hash chain value `h`."""
        if page == NULL_PAGE or h in self._page_of:
            return
        if page in self._hash_of:
            return
        self._hash_of[page] = h
        self._page_of[h] = page

    def clear_prefix_cache(self) -> int:
        """Forget every page's content (the model's parameters changed, so cached KV is stale):
        cached pages become free, pages in use stay in use but are never matched. -> pages
        that left the cache."""
        n = len(self._cached)
        self._free.extend(self._cached)
        self._cached.clear()
        self._hash_of.clear()
        self._page_of.clear()
        return n

    # -- stats -------------------------------------------------------------------

    def stats(self) -> PoolStats:
        return PoolStats(
            num_pages=self.num_pages,
            in_use=self.num_in_use,
            cached=len(self._cached),
            free=len(self._free),
            prefix_hits=self.prefix_hits,
            prefix_queries=self.prefix_queries,
            evictions=self.evictions,
            cow_copies=self.cow_copies,
        )

    def check(self) -> None:
        """Assert the pool's invariants (used by tests and debug runs)."""
        assert self.refcount[NULL_PAGE] == 0, "null page has references"
        assert (self.refcount >= 0).all(), "negative refcount"
        free, cached = set(self._free), set(self._cached)
        assert len(free) == len(self._free), "page twice in the free list"
        assert not (free & cached), "page both free and cached"
        assert NULL_PAGE not in free | cached
        for p in free | cached:
            assert self.refcount[p] == 0, f"page {p} listed free/cached with refcount"
        in_use = {int(p) for p in np.nonzero(self.refcount)[0]}
        assert in_use | free | cached == set(range(1, self.num_pages)), "page lost"
        for p in cached:
            assert p in self._hash_of, f"cached page {p} has no hash"
        for h, p in self._page_of.items():
            assert self._hash_of.get(p) == h, "hash maps disagree"
