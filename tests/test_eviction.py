"""Eviction of an over-full page keeps the most recently used entries.

All tests use a single page, so every key competes for the same space.  The
engine's LRU rules (fmm.h, "LRU"): the page's logical clock advances on
every store, and the stored entry takes the new value; a get hit re-stamps
its entry with the current clock only when the stamp is stale (older than
1/16 of the clock span the page holds, or from an earlier second).  Eviction
drops the oldest stamps first and renumbers the survivors densely.
get_keys() touches nothing.  The model below applies the same rules with
the clock frozen, and checks that no evicted entry was newer than a kept
one.
"""

from __future__ import annotations

import pytest

NOW = 1_800_000_000


class LRUModel:
    """Stamps of the entries of one page, as the engine keeps them."""

    def __init__(self, c=None) -> None:
        self.values: dict = {}
        self.stamp: dict = {}
        self.clock = 0
        self.pending: list = []
        self.c = c
        if c is not None:
            c._set_time_override(NOW)  # stamps from one second: only the clock rule acts

    @property
    def order(self):
        return self.values

    def touch(self, key, value=None, *, store=False) -> None:
        if store:
            self.pending.append((key, value))
            return
        # stale: older than 1/16 of the clock span the page holds (live * cap / used)
        info = self.c._page_info(0)
        used = info["free_data"] - info["data_start"]
        cap = self.c.page_size - info["data_start"]
        assert info["live"] == len(self.stamp)
        if (self.clock - self.stamp[key]) * used > (info["live"] * cap) >> 4:
            self.stamp[key] = self.clock

    def check(self, c) -> int:
        """Assert the page holds what the model does, less evictions of the
        oldest stamps; forget evicted keys.  Returns how many were evicted
        (by the store since the last check)."""
        present = {d["key"]: d["value"] for d in c.get_keys(2)}
        pending, self.pending = self.pending, []
        for key, value in pending[:-1]:  # stores checked together: none may evict
            assert key in present
            self.values[key] = value
            self.clock += 1
            self.stamp[key] = self.clock
        key, value = pending[-1] if pending else (None, None)
        extra = set(present) - set(self.values) - {key}
        assert not extra, f"cache holds keys the model never stored: {extra}"
        evicted = [k for k in self.values if k not in present and k != key]
        old = [k for k in self.values if k in present and k != key]
        if evicted:
            newest_gone = max(self.stamp[k] for k in evicted)
            oldest_kept = min((self.stamp[k] for k in old), default=newest_gone)
            assert newest_gone <= oldest_kept, (
                "an entry was evicted though a less recently used one was kept: "
                f"evicted {sorted(evicted, key=self.stamp.get)[-3:]} (stamp {newest_gone}), "
                f"kept {sorted(old, key=self.stamp.get)[:3]} (stamp {oldest_kept})"
            )
            for k in evicted:
                del self.values[k], self.stamp[k]
            # the compaction renumbers what it kept: dense ranks, ties kept
            ranks = {s: i + 1 for i, s in enumerate(sorted({self.stamp[k] for k in old}))}
            for k in old:
                self.stamp[k] = ranks[self.stamp[k]]
            self.clock = len(ranks)
        if key is not None:
            if key in self.stamp and key not in old:
                del self.stamp[key]  # its old entry went with the compaction
            self.values[key] = value
            self.clock += 1
            self.stamp[key] = self.clock
        assert present == self.values, "a value changed"
        return len(evicted)


def entry_bytes(key: str, value: bytes) -> int:
    return 20 + len(key.encode()) + len(value)


def test_random_workload_keeps_a_most_recent_suffix(cache, rand):
    page_size = 8192
    c = cache(num_pages=1, page_size=page_size)
    model = LRUModel(c)
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
    model = LRUModel(c)
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
    keys = [f"{i}" for i in range(5000)]
    for k in keys:
        assert c.set(k, b"") is True
    present = set(c.get_keys(0))
    # stores only: stamps follow the store order, so what is kept is the newest keys
    assert present == set(keys[len(keys) - len(present):])
    assert len(present) >= 500
