"""Eviction of an over-full page keeps the most recently used entries.

All tests use a single page, so every key competes for the same space.  The
engine's LRU order is exact (a per-page logical clock): a set or a get hit
makes an entry the most recent; get_keys() does not touch the order.  So at
any moment the entries still present must be exactly the most recently used
ones, a suffix of the access order.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest


class LRUModel:
    """Access order of keys, oldest first, with the value last written."""

    def __init__(self) -> None:
        self.order: OrderedDict = OrderedDict()

    def touch(self, key, value=None, *, store=False) -> None:
        if store:
            self.order[key] = value
        self.order.move_to_end(key)

    def check(self, c) -> int:
        """Assert the cache holds a most-recent suffix; forget evicted keys.
        Returns the number of entries evicted since the last check."""
        present = {d["key"]: d["value"] for d in c.get_keys(2)}
        keys = list(self.order)
        cut = len(keys) - len(present)
        assert cut >= 0, f"cache holds keys the model never stored: {set(present) - set(keys)}"
        assert set(keys[cut:]) == set(present), (
            "the entries left are not the most recently used ones: "
            f"evicted though recent: {sorted(set(keys[cut:]) - set(present))[:10]}; "
            f"kept though older: {sorted(set(present) - set(keys[cut:]))[:10]}"
        )
        for k in keys[:cut]:
            del self.order[k]
        assert present == dict(self.order), "a value changed"
        return cut


def entry_bytes(key: str, value: bytes) -> int:
    return 20 + len(key.encode()) + len(value)


def test_random_workload_keeps_a_most_recent_suffix(cache, rand):
    page_size = 8192
    c = cache(num_pages=1, page_size=page_size)
    model = LRUModel()
    pool = [f"key{i:03d}" for i in range(150)]
    evictions = 0
    for i in range(1500):
        key = rand.choice(pool)
        if rand.random() < 0.6:
            value = f"{key}:{i}:".encode().ljust(rand.randint(10, 300), b".")
            assert c.set(key, value) is True, "a set that fits an empty page must succeed"
            model.touch(key, value, store=True)
        else:
            got = c.get(key)
            if key in model.order:
                assert got == model.order[key]
                model.touch(key)
            else:
                assert got is None
        evicted = model.check(c)
        if evicted:
            evictions += 1
            live = sum(entry_bytes(k, v) for k, v in model.order.items())
            assert live >= page_size // 4, f"eviction left only {live} bytes in a {page_size}-byte page"
    assert evictions > 0, "the workload never filled the page (test is too weak)"


def test_a_recently_read_entry_survives(cache):
    c = cache(num_pages=1, page_size=8192)
    c.set("hot", b"h" * 100)
    cold = [f"cold{i:03d}" for i in range(300)]
    for i, k in enumerate(cold):
        assert c.set(k, b"c" * 100)
        if i % 10 == 9:
            assert c.get("hot") == b"h" * 100
    keys = set(c.get_keys(0))
    assert "hot" in keys
    assert "cold000" not in keys, "nothing was evicted: test too weak"
    assert set(cold[-10:]) <= keys
    # Oldest cold keys go first: what is left of them is a suffix.
    left = [k for k in cold if k in keys]
    assert left == cold[len(cold) - len(left):]


def test_an_overwrite_refreshes_the_entry(cache):
    c = cache(num_pages=1, page_size=8192)
    keys = [f"k{i:03d}" for i in range(200)]
    c.set("refreshed", b"0" * 100)
    for i, k in enumerate(keys):
        c.set(k, b"x" * 100)
        if i % 10 == 9:
            c.set("refreshed", str(i).encode().ljust(100, b"."))
    assert c.get("refreshed") == b"199".ljust(100, b".")


def test_a_big_item_evicts_enough_old_entries(cache):
    c = cache(num_pages=1, page_size=16384)
    model = LRUModel()
    for i in range(100):
        k, v = f"k{i:03d}", b"v" * 100
        assert c.set(k, v)
        model.touch(k, v, store=True)
    assert model.check(c) == 0, "test setup: the first 100 entries must fit"
    big = b"B" * 10_000
    assert c.set("big", big) is True
    model.touch("big", big, store=True)
    assert model.check(c) > 0
    assert c.get("big") == big


def test_an_oversize_set_evicts_nothing(cache):
    c = cache(num_pages=1, page_size=8192)
    for i in range(50):
        c.set(f"k{i}", b"v" * 100)
    before = {d["key"]: d["value"] for d in c.get_keys(2)}
    assert c.set("huge", b"H" * 8192) is False
    with pytest.raises(ValueError):
        c["huge"] = b"H" * 8192
    assert c.set("k0", b"H" * 8192) is False
    after = {d["key"]: d["value"] for d in c.get_keys(2)}
    assert after == before


def test_eviction_with_many_small_entries_runs_out_of_slots_not_bytes(cache):
    """Tiny entries exhaust the slot table long before the data area: the
    page must grow its slot table or evict, and every set must succeed."""
    c = cache(num_pages=1, page_size=65536)
    model = LRUModel()
    for i in range(5000):
        k = f"{i}"
        assert c.set(k, b"") is True
        model.touch(k, b"", store=True)
    model.check(c)
    assert len(c) >= 500
