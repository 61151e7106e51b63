"""Cache::FastMmap's own test suite (t/1, 2, 3, 9, 12, 14, 16, 17), carried over.

Adapted where our documented API differs from Perl's: keys are only str or
bytes (Perl stringifies references); set(..., expire_time=0) means "never"
(Perl: expired at once); page sizes are at least 1 KiB; get_and_set returns
only the new value; get_and_remove returns only the value.
"""

from __future__ import annotations

import time

import pytest

T0 = 1_700_000_000


# ---------------------------------------------------------------- t/1.t


def test_t1_basic(cache):
    c = cache()  # defaults: 89 pages of 64 KiB

    # get/set/exists with unusual keys
    for key in ["", " ", "k" * 1024]:
        assert not c.exists(key)
        assert c.get(key) is None
        assert c.set(key, "abc") is True
        assert c.exists(key)
        assert c.get(key) == "abc"
    # a 64 KB key can never fit a 64 KB page
    big_key = "k" * 65536
    assert c.set(big_key, "abc") is False
    assert c.get(big_key) is None and not c.exists(big_key)

    # empty and 1 KB values
    assert c.set("empty", "") is True and c.get("empty") == ""
    assert c.set("empty-b", b"") is True and c.get("empty-b") == b""
    assert c.set("1k", "v" * 1024) is True and c.get("1k") == "v" * 1024

    # a value larger than a page fails, and the old value stays
    assert c.set("1k", "v" * 70000) is False
    assert c.get("1k") == "v" * 1024

    # UTF-8 keys and values
    ukey, uval = "\u263a\u00e9\u4e2d", "\u00fcber \u263a"
    assert c.set(ukey, uval) is True
    assert c.get(ukey) == uval
    assert c.get(ukey.encode()) == uval
    assert c.exists(ukey)

    # get_keys(0) and get_keys(2)
    expected = {"": "abc", " ": "abc", "k" * 1024: "abc", "empty": "", "empty-b": b"", "1k": "v" * 1024, ukey: uval}
    assert sorted(c.get_keys(0), key=repr) == sorted(expected, key=repr)
    assert {d["key"]: d["value"] for d in c.get_keys(2)} == expected

    # get_and_set: return value, and the value is stored
    c.set("cnt", 1)
    assert c.get_and_set("cnt", lambda k, v: v + 1) == 2
    assert c.get("cnt") == 2

    # clear
    c.clear()
    assert c.get_keys(0) == []
    assert not c.exists("")

    # multi_get / multi_set
    c.multi_set("page1", {"k1": 1, "k2": "two", "k3": [3]})
    got = c.multi_get("page1", ["k1", "k2", "k3", "k4"])
    assert (got["k1"], got["k2"], got["k3"]) == (1, "two", [3])
    assert got.get("k4") is None


# ---------------------------------------------------------------- t/2.t


@pytest.mark.parametrize("default", [3, 5])
def test_t2_default_expire_time(cache, default):
    c = cache(num_pages=3, expire_time=default)
    c._set_time_override(T0)
    c.set("abc", "123")
    c.set("def", "456", expire_time=default + 10)
    c.set("ghi", "789", expire_time="never")
    for dt in range(default):
        c._set_time_override(T0 + dt)
        assert c.get("abc") == "123"
    c._set_time_override(T0 + default)
    assert c.get("abc") is None
    assert c.get("def") == "456"
    c._set_time_override(T0 + default + 10)
    assert c.get("def") is None
    assert c.get("ghi") == "789"


def test_t2_per_set_expiry_and_units(cache):
    c = cache(num_pages=3)
    c._set_time_override(T0)
    c.set("three", 1, expire_time=3)
    c.set("now", 1, expire_time="now")
    c.set("never", 1, expire_time="never")
    c.set("2m", 1, expire_time="2m")
    c.set("1h", 1, expire_time="1h")
    c.set("1d", 1, expire_time="1d")
    assert c.get("now") is None
    assert {d["key"]: d["expire_on"] for d in c.get_keys(1)} == {
        "three": T0 + 3,
        "never": 0,
        "2m": T0 + 120,
        "1h": T0 + 3600,
        "1d": T0 + 86400,
    }
    for t, alive in [
        (T0 + 2, {"three", "never", "2m", "1h", "1d"}),
        (T0 + 3, {"never", "2m", "1h", "1d"}),
        (T0 + 120, {"never", "1h", "1d"}),
        (T0 + 3600, {"never", "1d"}),
        (T0 + 86400, {"never"}),
    ]:
        c._set_time_override(t)
        assert set(c.get_keys(0)) == alive, t


def test_t2_get_keys_2_times(cache):
    c = cache(num_pages=3, expire_time=10)
    c._set_time_override(T0)
    c.set("k", "v")
    c._set_time_override(T0 + 4)
    c.get("k")
    [d] = c.get_keys(2)
    assert (d["key"], d["value"], d["last_access"], d["expire_on"]) == ("k", "v", T0 + 4, T0 + 10)


# ---------------------------------------------------------------- t/3.t


def _mix(c, rand, n_keys, ratio, n_ops):
    """Random gets and sets over n_keys keys (all written first).
    Returns (reads, hits); every hit must return the latest value."""
    latest = {}
    for i in range(n_keys):
        k = f"key{i:05d}"
        latest[k] = f"{k}:0:".ljust(rand.randint(60, 100), "x")
        c.set(k, latest[k])
    c.get_statistics(clear=True)
    reads = hits = 0
    for n in range(n_ops):
        k = f"key{rand.randrange(n_keys):05d}"
        if rand.random() < ratio:
            reads += 1
            v = c.get(k)
            if v is not None:
                hits += 1
                assert v == latest[k], "a stale value was returned"
        else:
            latest[k] = f"{k}:{n}:".ljust(rand.randint(60, 100), "x")
            assert c.set(k, latest[k]) is True
    return reads, hits


def test_t3_no_reads(cache, rand):
    c = cache(num_pages=3, enable_stats=True)
    reads, hits = _mix(c, rand, 100, 0.0, 1000)
    assert (reads, hits) == (0, 0)
    assert tuple(c.get_statistics()) == (0, 0)


@pytest.mark.parametrize("ratio", [0.5, 0.8])
def test_t3_working_set_fits_all_hits(cache, rand, ratio):
    c = cache(num_pages=7, enable_stats=True)
    reads, hits = _mix(c, rand, 300, ratio, 1000)
    assert reads > 0 and hits == reads
    assert tuple(c.get_statistics()) == (reads, hits)


def test_t3_working_set_too_big_hit_rate_shows_eviction(cache, rand):
    c = cache(num_pages=4, page_size=8192, enable_stats=True)
    # 300 keys of ~105 bytes against ~30 KB of data area: a little over
    # capacity.  Measured: the hit rate is about 0.80 whatever the seed
    # (Perl's own bounds for its setup were 0.8 .. 0.95).
    reads, hits = _mix(c, rand, 300, 0.5, 10000)
    rate = hits / reads
    assert 0.65 < rate < 0.95, f"hit rate {rate:.3f} ({rand!r})"
    assert tuple(c.get_statistics()) == (reads, hits)


# ---------------------------------------------------------------- t/9.t


@pytest.mark.parametrize("kind", ["raw", "pickled"])
def test_t9_last_25_writes_stay_readable(cache, rand, kind):
    c = cache(num_pages=3, page_size=8192)
    recent = []
    for i in range(500):
        key = rand.word(10, 10)
        body = rand.word(20, 80)
        value = body.encode() if kind == "raw" else {"i": i, "body": body}
        c._set_time_override(T0 + i)  # Perl slept 10 ms; our LRU needs no clock
        assert c.set(key, value) is True
        recent = [(k, v) for k, v in recent if k != key][-24:] + [(key, value)]
        for k, v in recent:
            assert c.get(k) == v, f"iteration {i}: recent key {k!r} lost ({rand!r})"


# ---------------------------------------------------------------- t/12.t


def _increment_many(c, key, n):
    for _ in range(n):
        c.get_and_set(key, lambda k, v: (v or 0) + 1)
    return n


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_t12_two_processes_5000_increments_each(cache, forked):
    c = cache(num_pages=3, lock_timeout=30)
    children = [forked.start(_increment_many, c, "count", 5000) for _ in range(2)]
    for child in children:
        assert child.result(60) == 5000
    assert c.get("count") == 10000


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_t12_get_and_remove_is_atomic(cache, forked):
    """The parent sets a key and get_and_removes it; a child keeps removing
    it.  Every value set is consumed exactly once, by one of them."""
    c = cache(num_pages=3, lock_timeout=30)
    n = 5000

    def child():
        c.set("child-ready", 1)
        removed = 0
        while not c.exists("done"):
            if c.remove("key"):
                removed += 1
        if c.remove("key"):
            removed += 1
        return removed

    proc = forked.start(child)
    deadline = time.monotonic() + 30
    while not c.exists("child-ready"):
        assert time.monotonic() < deadline, "child never started: possible deadlock"
        time.sleep(0.001)
    got = 0
    for i in range(n):
        c.set("key", i)
        v = c.get_and_remove("key")
        if v is not None:
            assert v == i
            got += 1
    c.set("done", 1)
    removed = proc.result(60)
    assert got + removed == n, f"parent got {got}, child removed {removed}"
    assert not c.exists("key")


# ---------------------------------------------------------------- t/14.t


def test_t14_statistics(cache):
    c = cache(enable_stats=True)
    assert tuple(c.get_statistics()) == (0, 0)
    c.set("abc", "123")
    for _ in range(101):
        assert c.get("abc") == "123"
    assert c.get("def") is None
    assert tuple(c.get_statistics()) == (102, 101)
    assert tuple(c.get_statistics(clear=True)) == (102, 101)
    assert tuple(c.get_statistics()) == (0, 0)
    c.get("abc")
    assert tuple(c.get_statistics(True)) == (1, 1)


def test_t14_statistics_are_shared_through_the_file(cache):
    path = cache.path()
    a = cache(path, num_pages=5, enable_stats=True)
    b = cache(path, enable_stats=True)
    a.set("k", 1)
    a.get("k")
    b.get("k")
    b.get("missing")
    assert tuple(a.get_statistics()) == (3, 2)


# ---------------------------------------------------------------- t/16.t


@pytest.mark.slow
def test_t16_slot_ordering_with_deletes(cache, rand):
    """One 32 KB page: 20 rounds of (100 sets, then 50 x (remove, set, and
    check all 100 keys)).  Deleted slots must never hide a live key."""
    c = cache(num_pages=1, page_size=32768)
    for rnd in range(20):
        c.clear()
        model = {}
        while len(model) < 100:
            k, v = rand.word(1, 12), rand.word(0, 40)
            assert c.set(k, v) is True
            model[k] = v
        for step in range(50):
            gone = rand.choice(list(model))
            assert c.remove(gone) is True
            del model[gone]
            k, v = rand.word(1, 12), rand.word(0, 40)
            while k in model or k == gone:
                k = rand.word(1, 12)
            assert c.set(k, v) is True
            model[k] = v
            for key, value in model.items():
                assert c.get(key) == value, f"round {rnd} step {step}: {key!r} ({rand!r})"
            assert c.get(gone) is None
        assert len(c) == 100


# ---------------------------------------------------------------- t/17.t


def test_t17_deleted_slots_are_reused(cache):
    """Two 31,000-byte values fill most of a 64 KB page; 90 rounds of
    set/get/remove of a small key must not push them out."""
    c = cache(num_pages=1, page_size=65536)
    big_a, big_b = "a" * 31000, "b" * 31000
    assert c.set("big-a", big_a) is True
    assert c.set("big-b", big_b) is True
    for i in range(90):
        assert c.set("small", "x") is True, i
        assert c.get("small") == "x"
        assert c.remove("small") is True
        assert c.get("big-a") == big_a, f"big value evicted at round {i}"
        assert c.get("big-b") == big_b, f"big value evicted at round {i}"
    assert sorted(c.get_keys(0)) == ["big-a", "big-b"]
