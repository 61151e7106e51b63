"""Expiry, driven by the per-Cache clock override ``_set_time_override``.

An entry stored at time t with a TTL of n seconds has expire_on = t + n and
is live while now < expire_on (Cache::FastMmap: expired when
now >= expire_on).  Unlike Perl, our set() treats expire_time 0 as "never".
"""

from __future__ import annotations

import datetime
import time

import pytest

T0 = 1_700_000_000


@pytest.fixture
def clocked(cache):
    """A cache factory whose caches start with the clock at T0."""

    def make(**opts):
        c = cache(**{"num_pages": 3, **opts})
        c._set_time_override(T0)
        return c

    return make


def expire_on(c, key):
    [entry] = [d for d in c.get_keys(1) if d["key"] == key]
    return entry["expire_on"]


def live(c, key):
    """Every read path agrees on whether key is live."""
    views = {
        "get": c.get(key, "<miss>") != "<miss>",
        "in": key in c,
        "exists": c.exists(key),
        "keys": key in list(c.keys()),
    }
    assert len(set(views.values())) == 1, views
    return views["in"]


def test_default_expire_time(clocked):
    c = clocked(expire_time=3)
    c.set("k", "v")
    assert expire_on(c, "k") == T0 + 3
    c._set_time_override(T0 + 2)
    assert live(c, "k")
    c._set_time_override(T0 + 3)
    assert not live(c, "k")
    with pytest.raises(KeyError):
        c["k"]


def test_no_default_expiry_means_never(clocked):
    c = clocked()
    c.set("k", "v")
    assert expire_on(c, "k") == 0
    c._set_time_override(T0 + 10 * 365 * 86400)
    assert live(c, "k")


def test_per_set_expire_time_overrides_default(clocked):
    c = clocked(expire_time=100)
    c.set("short", 1, 3)
    c.set("long", 2, expire_time=10)
    c.set("dflt", 3)
    c.set("dflt-none", 4, expire_time=None)
    assert expire_on(c, "short") == T0 + 3
    assert expire_on(c, "long") == T0 + 10
    assert expire_on(c, "dflt") == T0 + 100
    assert expire_on(c, "dflt-none") == T0 + 100
    c._set_time_override(T0 + 5)
    assert not live(c, "short") and live(c, "long") and live(c, "dflt")
    c._set_time_override(T0 + 50)
    assert not live(c, "long") and live(c, "dflt")
    c._set_time_override(T0 + 100)
    assert not live(c, "dflt") and not live(c, "dflt-none")


@pytest.mark.parametrize("never", [0, "never"])
def test_set_with_never_ignores_the_default(clocked, never):
    c = clocked(expire_time=5)
    c.set("k", "v", expire_time=never)
    assert expire_on(c, "k") == 0
    c._set_time_override(T0 + 10**6)
    assert live(c, "k")


def test_set_with_now_expires_at_once(clocked):
    c = clocked(expire_time=100)
    c.set("old", "v")
    c.set("old", "v2", expire_time="now")
    assert not live(c, "old")
    assert c.get("old") is None


def test_constructor_now_expires_at_once(clocked):
    c = clocked(expire_time="now")
    c.set("k", "v")
    assert not live(c, "k")
    # An explicit TTL on the set still works.
    c.set("k2", "v", expire_time=10)
    assert live(c, "k2")


@pytest.mark.parametrize(
    "spec, seconds",
    [(45, 45), ("30s", 30), ("5m", 300), ("2h", 7200), ("1d", 86400), ("1w", 604800), ("never", 0)],
)
def test_expire_time_units(clocked, spec, seconds):
    c = clocked(expire_time=spec)
    assert c.expire_time == seconds
    c.set("ctor", 1)
    c.set("per-set", 1, expire_time=spec)
    want = T0 + seconds if seconds else 0
    assert expire_on(c, "ctor") == want
    assert expire_on(c, "per-set") == want


def test_expire_on_is_absolute(clocked):
    c = clocked(expire_time=5)
    c.set("k", "v", expire_on=T0 + 1000)
    assert expire_on(c, "k") == T0 + 1000
    c._set_time_override(T0 + 999)
    assert live(c, "k")
    c._set_time_override(T0 + 1000)
    assert not live(c, "k")


def test_expire_on_in_the_past_is_expired(clocked):
    c = clocked()
    c.set("k", "v", expire_on=T0 - 1)
    assert not live(c, "k")


def test_expired_entry_on_other_paths(clocked):
    c = clocked()
    c.set("a", 1, expire_time=5)
    c.set("b", 2, expire_time=5)
    c.set("c", 3, expire_time=5)
    c._set_time_override(T0 + 5)
    assert c.get_and_remove("a") is None
    assert c.remove("b") is False
    seen = []
    assert c.get_and_set("c", lambda k, old: seen.append(old) or 30) == 30
    assert seen == [None]
    assert c["c"] == 30
    with pytest.raises(KeyError):
        del c["a"]
    assert c.get_keys(0) == ["c"]


def test_overwriting_an_expired_key(clocked):
    c = clocked()
    c.set("k", "old", expire_time=2)
    c._set_time_override(T0 + 10)
    assert not live(c, "k")
    c.set("k", "new", expire_time=2)
    assert c["k"] == "new"
    assert expire_on(c, "k") == T0 + 12


def test_get_and_set_uses_the_default_expiry(clocked):
    c = clocked(expire_time=10)
    assert c.get_and_set("n", lambda k, v: 1) == 1
    assert expire_on(c, "n") == T0 + 10
    c._set_time_override(T0 + 10)
    assert not live(c, "n")


def test_multi_set_expiry(clocked):
    c = clocked()
    c.multi_set("grp", {"a": 1, "b": 2}, expire_time=5)
    c._set_time_override(T0 + 4)
    got = c.multi_get("grp", ["a", "b"])
    assert (got["a"], got["b"]) == (1, 2)
    c._set_time_override(T0 + 5)
    got = c.multi_get("grp", ["a", "b"])
    assert got.get("a") is None and got.get("b") is None


def test_get_keys_last_access_and_expire_on(clocked):
    """Perl t/2 and t/23: get_keys reports last_access (updated by reads) and expire_on."""
    c = clocked()
    c.set("k", "v", expire_time=60)
    c.set("other", "v")
    [d] = [d for d in c.get_keys(2) if d["key"] == "k"]
    assert (d["last_access"], d["expire_on"], d["value"]) == (T0, T0 + 60, "v")
    c._set_time_override(T0 + 7)
    assert c.get("k") == "v"
    [d] = [d for d in c.get_keys(1) if d["key"] == "k"]
    assert (d["last_access"], d["expire_on"]) == (T0 + 7, T0 + 60)
    c.set("k", "v2")
    [d] = [d for d in c.get_keys(1) if d["key"] == "k"]
    assert (d["last_access"], d["expire_on"]) == (T0 + 7, 0)
    c._set_time_override(T0 + 8)
    assert c.get_and_set("k", lambda key, old: old + "!") == "v2!"
    [d] = [d for d in c.get_keys(2) if d["key"] == "k"]
    assert (d["last_access"], d["value"]) == (T0 + 8, "v2!")


def test_get_keys_hides_expired(clocked):
    c = clocked()
    c.set("gone", 1, expire_time=1)
    c.set("here", 2)
    c._set_time_override(T0 + 1)
    for mode in (0, 1, 2):
        keys = [k if mode == 0 else k["key"] for k in c.get_keys(mode)]
        assert keys == ["here"]


@pytest.mark.parametrize("how", ["purge", "empty_only_expired"])
def test_purge_drops_expired_only(clocked, how):
    c = clocked()
    c.set("gone", 1, expire_time=5)
    c.set("stays", 2)
    c.set("later", 3, expire_time=50)
    c._set_time_override(T0 + 10)
    if how == "purge":
        c.purge()
    else:
        c.empty(only_expired=True)
    assert sorted(c) == ["later", "stays"]
    # Turn the clock back: a purged entry is really gone, not just hidden.
    c._set_time_override(T0)
    assert sorted(c) == ["later", "stays"]


def test_empty_drops_everything(clocked):
    c = clocked()
    c.set("a", 1, expire_time=5)
    c.set("b", 2)
    c.empty()
    c._set_time_override(T0)
    assert len(c) == 0


def test_time_override_zero_restores_the_real_clock(clocked):
    c = clocked()
    # Stored "in 2023" with a one-hour TTL: long expired in real time.
    c.set("k", "v", expire_time=3600)
    assert live(c, "k")
    c._set_time_override(0)
    assert not live(c, "k")
    c.set("fresh", "v", expire_time=3600)
    assert abs(expire_on(c, "fresh") - (int(time.time()) + 3600)) <= 2
    [d] = [d for d in c.get_keys(1) if d["key"] == "fresh"]
    assert abs(d["last_access"] - time.time()) <= 2


def test_time_override_is_per_cache_object(cache):
    path = cache.path()
    a = cache(path, num_pages=3)
    b = cache(path)
    a.set("k", "v", expire_time=3600)
    a._set_time_override(int(time.time()) + 7200)
    assert "k" not in a
    assert "k" in b  # b still runs on the real clock


def test_expired_entries_make_room_before_live_ones_are_evicted(clocked):
    """Under space pressure, expired entries are reclaimed before any live
    entry is evicted, even live entries that are older (in LRU order)."""
    c = clocked(num_pages=1, page_size="16k")
    value = "v" * 60
    live_keys = [f"live{i:03d}" for i in range(10)]
    for k in live_keys:
        assert c.set(k, value)
    temp_keys = [f"temp{i:03d}" for i in range(100)]
    for k in temp_keys:  # about 9 KB that will expire
        assert c.set(k, value, expire_time=5)
    # (get_keys does not touch the LRU order: the live keys stay the oldest.)
    assert sorted(c.get_keys(0)) == sorted(live_keys + temp_keys), "test setup: nothing evicted yet"
    c._set_time_override(T0 + 5)
    new_keys = [f"new{i:03d}" for i in range(60)]  # about 5 KB: the page must be compacted
    for k in new_keys:
        assert c.set(k, value)
    assert sorted(c.get_keys(0)) == sorted(live_keys + new_keys)


# ---------------------------------------------------------------- sub-second expiry


@pytest.mark.parametrize("spec", [0.25, datetime.timedelta(milliseconds=250)], ids=["float", "timedelta"])
def test_sub_second_expire_time(clocked, spec):
    """The native format keeps milliseconds: 0.25 is 250 ms, not a second."""
    c = clocked()
    c.set("k", "v", expire_time=spec)
    assert expire_on(c, "k") == T0 + 0.25
    c._set_time_override(T0 + 0.249)
    assert live(c, "k")
    c._set_time_override(T0 + 0.25)
    assert not live(c, "k")


def test_sub_second_default_and_absolute_expiry(clocked):
    c = clocked(expire_time=1.5)
    assert c.expire_time == 1.5
    c.set("dflt", 1)
    c.set("abs", 2, expire_on=T0 + 0.75)
    c.set("whole", 3, expire_time=2)
    assert (expire_on(c, "dflt"), expire_on(c, "abs"), expire_on(c, "whole")) == (T0 + 1.5, T0 + 0.75, T0 + 2)
    assert type(expire_on(c, "whole")) is int  # whole seconds stay ints
    c._set_time_override(T0 + 0.75)
    assert not live(c, "abs") and live(c, "dflt")
    c._set_time_override(T0 + 1.5)
    assert not live(c, "dflt") and live(c, "whole")
    assert clocked(expire_time=2).expire_time == 2


def test_perl_format_keeps_whole_seconds(clocked):
    """Perl's Cache::FastMmap stores whole seconds: a fraction rounds up."""
    c = clocked(format="perl", serializer="raw", expire_time=0.25)
    assert c.expire_time == 1
    c.set("k", b"v")
    c.set("k2", b"v", expire_time=1.5)
    c.set("abs", b"v", expire_on=T0 + 0.5)
    assert (expire_on(c, "k"), expire_on(c, "k2"), expire_on(c, "abs")) == (T0 + 1, T0 + 2, T0 + 1)


def test_sub_second_expiry_with_the_real_clock(cache):
    """expire_time=0.25 with real time: the entry is there for at least
    250 ms and gone 10 ms later.  Each bound is asserted only for reads that
    the monotonic clock places certainly inside its window (the time taken
    before the set to after the get for the first, after the set to before
    the get for the second), so a loaded machine makes the test take
    longer, never fail."""
    c = cache(num_pages=3)
    present_seen = absent_seen = 0
    for attempt in range(20):
        before_set = time.monotonic()
        c.set("k", "v", expire_time=0.25)
        after_set = time.monotonic()
        while True:
            before_get = time.monotonic()
            hit = c.get("k") is not None
            after_get = time.monotonic()
            if after_get - before_set < 0.25:
                assert hit, f"gone {after_get - before_set:.4f} s after the set began"
                present_seen += 1
            if before_get - after_set >= 0.26:
                assert not hit, f"still there {before_get - after_set:.4f} s after the set ended"
                absent_seen += 1
                break
            time.sleep(0.002)
        if present_seen and absent_seen:
            break
    assert present_seen and absent_seen, "the machine was too loaded to place any read"
