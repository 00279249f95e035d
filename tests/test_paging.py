"""Page pool invariants: property tests over random traces, prefix cache, copy-on-write."""

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_sched.serve.paging import NULL_PAGE, OutOfPages, PagePool, hash_chain


def test_allocate_and_free_round_trip():
    pool = PagePool(8, 4)
    pages = pool.allocate(7)
    assert NULL_PAGE not in pages and sorted(pages) == list(range(1, 8))
    with pytest.raises(OutOfPages):
        pool.allocate(1)
    pool.free(pages)
    assert pool.num_available == 7
    pool.check()
    with pytest.raises(ValueError, match="double free"):
        pool.free(pages[:1])


def test_failed_allocation_allocates_nothing():
    pool = PagePool(5, 4)
    pool.allocate(3)
    with pytest.raises(OutOfPages):
        pool.allocate(2)
    assert pool.num_available == 1
    pool.check()


def test_prefix_cache_hit_and_lru_eviction():
    pool = PagePool(4, 2)  # 3 usable pages
    tokens = [1, 2, 3, 4, 5, 6]
    hashes = hash_chain(tokens, 2)
    pages = pool.allocate(3)
    for p, h in zip(pages, hashes, strict=True):
        pool.register(p, h)
    pool.free(pages)  # tail first, so the last page is the least recently used
    assert pool.stats().cached == 3 and pool.stats().free == 0
    # a request with the same first two pages hits them
    hit = pool.lookup(hash_chain([1, 2, 3, 4, 9, 9], 2))
    assert hit == pages[:2]
    assert pool.refcount[pages[0]] == 1
    # allocation evicts the least recently used cached page (the third one)
    (new,) = pool.allocate(1)
    assert new == pages[2] and pool.stats().evictions == 1
    assert pool.lookup(hashes)[:2] == pages[:2]  # the first two survive
    pool.check()


def test_hash_chain_depends_on_whole_prefix():
    a = hash_chain([1, 2, 3, 4], 2)
    b = hash_chain([9, 9, 3, 4], 2)
    assert a[1] != b[1]  # same page tokens, different prefix
    assert hash_chain([1, 2, 3], 2) == a[:1]  # partial pages are not hashed


def test_copy_on_write_never_writes_a_shared_page():
    pool = PagePool(6, 2)
    (p,) = pool.allocate(1)
    pool.incref(p)  # shared by two sequences
    page, copy = pool.writable(p)
    assert page != p and copy == (p, page)
    assert pool.refcount[p] == 1 and pool.refcount[page] == 1
    again, copy2 = pool.writable(p)  # now the sole owner writes in place
    assert again == p and copy2 is None
    pool.free([p, page])
    pool.check()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 7), st.integers(1, 4)), max_size=60))
def test_random_traces_keep_invariants(ops):
    """Any trace of allocate / share / prefix-cache / write / free keeps the invariants,
    and freeing every holder returns every page to free or cached."""
    pool = PagePool(12, 2)
    holders: list[list[int]] = []
    for op, a, n in ops:
        if op == 0:
            with contextlib.suppress(OutOfPages):
                holders.append(pool.allocate(n))
        elif op == 1 and holders:
            pages = holders[a % len(holders)]
            for p in pages:
                pool.incref(p)
            holders.append(list(pages))
        elif op == 2 and holders:
            pages = holders[a % len(holders)]
            for i, p in enumerate(pages):
                pool.register(p, hash((a, i, tuple(pages[: i + 1]))))
        elif op == 3 and holders:
            pages = holders[a % len(holders)]
            i = n % len(pages) if pages else 0
            if pages:
                shared = pool.refcount[pages[i]] > 1
                try:
                    new, copy = pool.writable(pages[i])
                except OutOfPages:
                    continue
                assert (copy is not None) == shared  # shared pages are copied, never written
                assert pool.refcount[new] >= 1
                pages[i] = new
        elif op == 4 and holders:
            pool.free(holders.pop(a % len(holders)))
        elif op == 5:
            got = pool.lookup([hash((a, 0, (p,))) for p in range(1, 12)][:1])
            if got:
                holders.append(got)
        pool.check()
        assert (pool.refcount >= 0).all()
    for pages in holders:
        pool.free(pages)
    pool.check()
    assert pool.num_in_use == 0 and pool.num_available == 11


def test_kv_occupancy_counts_a_shared_page_once_as_full_as_its_fullest_user():
    from mlx_sched.serve.config import ServeConfig
    from mlx_sched.serve.request import Request, SamplingParams, Seq
    from mlx_sched.serve.scheduler import Scheduler

    pool = PagePool(16, 4)
    sched = Scheduler(ServeConfig(page_size=4, num_pages=16), pool)
    shared, a, b = pool.allocate(3)
    pool.incref(shared)
    req = Request("r", [1] * 6, SamplingParams(max_tokens=4, n=2), 0.0)
    req.seqs = [
        Seq(req, 0, [1] * 7, pages=[shared, a], num_computed=6),  # 4 + 2 tokens
        Seq(req, 1, [1] * 5, pages=[shared, b], num_computed=3),  # 3 in the shared page
    ]
    sched.running.append(req)
    assert sched.kv_occupancy() == (3, 4 + 2 + 0)
    req.seqs[0].done = True  # a finished sample no longer counts
    assert sched.kv_occupancy() == (3, 3)
