"""get_and_set and read_cb parity with Cache::FastMmap's read-modify-write API.

The behaviours of the upstream tests, written anew:

* t/1: get_and_set reports whether it stored (Perl's list context
  ``($new, $did_store)``): here ``with_stored=True``;
* t/2: the update function sets the new entry's expiry (Perl's
  ``($new, {expire_time => ...})``): here ``fastmmap.Update``;
* t/23: the function sees the entry's ``expire_on`` and can keep it;
* t/25: a conditional store, where the function stores nothing (Perl's
  empty list): here ``fastmmap.NO_CHANGE``; and with a modseq, the refused
  store is reported as not stored.

Plus read_cb returning a value with its own expiry.  Every test runs
against the native and the Perl file format.
"""

from __future__ import annotations

import pickle

import pytest

import fastmmap

T0 = 1_700_000_000


@pytest.fixture(params=["native", "perl"])
def make(cache, request):
    """make(**options) -> a Cache with its clock at T0, in either format."""
    fmt = {"format": "perl", "serializer": "json"} if request.param == "perl" else {}

    def mk(**options):
        c = cache(**{"num_pages": 3, "page_size": "16k", **fmt, **options})
        c._set_time_override(T0)
        return c

    return mk


def expire_on(c, key):
    [entry] = [d for d in c.get_keys(1) if d["key"] == key]
    return entry["expire_on"]


# ---------------------------------------------------------------- did it store (t/1)


def test_with_stored_reports_a_store(make):
    c = make()
    assert c.get_and_set("k", lambda key, old: (old or 0) + 1, with_stored=True) == (1, True)
    assert c.get_and_set("k", lambda key, old: old + 1, with_stored=True) == (2, True)
    assert c["k"] == 2


def test_simple_form_still_returns_the_value(make):
    c = make()
    assert c.get_and_set("k", lambda key, old: [old]) == [None]
    assert c["k"] == [None]


def test_with_stored_reports_a_modseq_refusal(make):
    c = make()
    c.set("k", "v5", modseq=5)
    assert c.get_and_set("k", lambda key, old: "v4", modseq=4, with_stored=True) == ("v5", False)
    assert c.get_and_set("k", lambda key, old: "v6", modseq=6, with_stored=True) == ("v6", True)
    assert c.get_modseq("k") == 6


def test_too_big_still_raises_and_keeps_the_old_value(make):
    c = make()
    c["k"] = "small"
    with pytest.raises(fastmmap.ItemTooLargeError):
        c.get_and_set("k", lambda key, old: "x" * 100_000, with_stored=True)
    assert c["k"] == "small"


# ---------------------------------------------------------------- no change (t/25)


def test_no_change_stores_nothing_for_an_absent_key(make):
    c = make()
    assert c.get_and_set("k", lambda key, old: fastmmap.NO_CHANGE) is None
    assert "k" not in c
    assert c.get_and_set("k", lambda key, old: fastmmap.NO_CHANGE, with_stored=True) == (None, False)


def test_no_change_keeps_value_and_expiry(make):
    c = make(expire_time=100)
    c.set("k", "v", expire_time=10)
    c._set_time_override(T0 + 5)
    assert c.get_and_set("k", lambda key, old: fastmmap.NO_CHANGE, with_stored=True) == ("v", False)
    assert expire_on(c, "k") == T0 + 10  # not renewed to T0 + 5 + 100


def test_get_if_present_store_if_not(make):
    """The 1.43 manual's use: add a value only if absent, without touching
    the expiry of an existing one."""
    c = make()
    c.set("k", "first", expire_on=T0 + 50)

    def fill(key, old):
        return fastmmap.NO_CHANGE if old is not None else "second"

    assert c.get_and_set("k", fill) == "first"
    assert expire_on(c, "k") == T0 + 50
    assert c.get_and_set("other", fill) == "second"


def test_no_change_calls_no_write_cb(make):
    writes = []
    c = make(write_cb=lambda ctx, key, value, exp: writes.append(key))
    c.get_and_set("k", lambda key, old: fastmmap.NO_CHANGE)
    assert writes == []
    c.get_and_set("k", lambda key, old: "v")
    assert writes == ["k"]


def test_no_change_is_a_singleton_that_pickles_as_itself():
    assert pickle.loads(pickle.dumps(fastmmap.NO_CHANGE)) is fastmmap.NO_CHANGE
    assert repr(fastmmap.NO_CHANGE) == "fastmmap.NO_CHANGE"


# ---------------------------------------------------------------- absent vs stored None


def test_default_tells_an_absent_key_from_a_stored_none(make):
    c = make()
    missing = object()
    seen = []

    def look(key, old):
        seen.append(old)
        return fastmmap.NO_CHANGE

    c.get_and_set("k", look, default=missing)
    c["k"] = None
    c.get_and_set("k", look, default=missing)
    assert seen[0] is missing and seen[1] is None


def test_default_is_returned_when_nothing_is_stored(make):
    c = make()
    assert c.get_and_set("k", lambda key, old: fastmmap.NO_CHANGE, default=7, with_stored=True) == (7, False)


def test_default_as_a_starting_value(make):
    c = make()
    c.get_and_set("n", lambda key, old: old + 1, default=0)
    c.get_and_set("n", lambda key, old: old + 1, default=0)
    assert c["n"] == 2


def test_entry_shows_existence_expiry_and_modseq(make):
    c = make()
    seen = []

    def look(key, e):
        seen.append(e)
        return fastmmap.NO_CHANGE

    c.get_and_set("k", look, entry=True)
    c.set("k", None, expire_on=T0 + 30, modseq=9)
    c.get_and_set("k", look, entry=True)
    c.set("k", "v")  # no expiry given, no default expiry: never
    c.get_and_set("k", look, entry=True)
    a, b, d = seen
    assert (a.value, a.exists, a.expire_on, a.modseq) == (None, False, None, None)
    assert (b.value, b.exists, b.expire_on, b.modseq) == (None, True, T0 + 30, 9)
    assert (d.value, d.exists, d.expire_on, d.modseq) == ("v", True, 0, None)


def test_entry_over_a_tombstone_is_absent(make):
    c = make()
    c.remove("k", modseq=3)
    seen = []
    c.get_and_set("k", lambda key, e: seen.append(e) or fastmmap.NO_CHANGE, entry=True)
    assert seen[0].exists is False


# ---------------------------------------------------------------- expiry from fn (t/2, t/23)


def test_update_with_expire_time(make):
    c = make(expire_time=100)
    assert c.get_and_set("k", lambda key, old: fastmmap.Update("v", expire_time=3)) == "v"
    assert expire_on(c, "k") == T0 + 3
    c.get_and_set("k", lambda key, old: fastmmap.Update("w", "2m"))
    assert expire_on(c, "k") == T0 + 120
    c.get_and_set("k", lambda key, old: fastmmap.Update("w", expire_time="never"))
    assert expire_on(c, "k") == 0


def test_update_with_expire_on(make):
    c = make()
    c.get_and_set("k", lambda key, old: fastmmap.Update("v", expire_on=T0 + 77))
    assert expire_on(c, "k") == T0 + 77
    assert c.get("k") == "v"


def test_update_without_expiry_uses_the_calls(make):
    c = make(expire_time=100)
    c.get_and_set("k", lambda key, old: fastmmap.Update("v"), expire_time=9)
    assert expire_on(c, "k") == T0 + 9
    c.get_and_set("k", lambda key, old: fastmmap.Update("v"))
    assert expire_on(c, "k") == T0 + 100


def test_keep_expiry_keeps_the_entrys_expire_on(make):
    c = make(expire_time=100)
    c.set("n", 1, expire_on=T0 + 40)
    c._set_time_override(T0 + 10)
    assert c.get_and_set("n", lambda key, old: fastmmap.Update(old + 1, keep_expiry=True)) == 2
    assert expire_on(c, "n") == T0 + 40
    c.set("forever", 1, expire_time="never")
    c.get_and_set("forever", lambda key, old: fastmmap.Update(old + 1, keep_expiry=True))
    assert expire_on(c, "forever") == 0


def test_keep_expiry_of_an_absent_key_uses_the_calls(make):
    c = make(expire_time=100)
    c.get_and_set("k", lambda key, old: fastmmap.Update(1, keep_expiry=True), expire_time=5)
    assert expire_on(c, "k") == T0 + 5


def test_fn_can_pass_the_entrys_expire_on_back(make):
    """As Perl's sub returning ($new, {expire_on => $opts->{expire_on}})."""
    c = make(expire_time=100)
    c.set("k", "a", expire_on=T0 + 60)
    c.get_and_set(
        "k", lambda key, e: fastmmap.Update(e.value + "b", expire_on=e.expire_on), entry=True
    )
    assert (c["k"], expire_on(c, "k")) == ("ab", T0 + 60)


def test_update_value_goes_to_write_cb(make):
    writes = []
    c = make(write_cb=lambda ctx, key, value, exp: writes.append((key, value, exp)))
    c.get_and_set("k", lambda key, old: fastmmap.Update("v", expire_on=T0 + 8))
    assert writes == [("k", "v", T0 + 8)]


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"expire_time": -1}, ValueError),
        ({"expire_time": "1 month"}, ValueError),
        ({"expire_on": -5}, ValueError),
        ({"expire_on": "soon"}, ValueError),
        ({"expire_time": 5, "expire_on": T0}, ValueError),
        ({"expire_time": 5, "keep_expiry": True}, ValueError),
        ({"keep_expiry": 1}, TypeError),
    ],
)
def test_bad_update_is_refused_where_it_is_made(make, kwargs, error):
    c = make()
    c["k"] = "old"
    with pytest.raises(error):
        c.get_and_set("k", lambda key, old: fastmmap.Update("new", **kwargs))
    assert c["k"] == "old"
    assert expire_on(c, "k") == 0


# ---------------------------------------------------------------- read_cb with an expiry


def test_read_cb_update_sets_the_entrys_expiry(make):
    c = make(expire_time=100, read_cb=lambda ctx, key: fastmmap.Update("v-" + key, expire_time=7))
    assert c.get("a") == "v-a"
    assert c["b"] == "v-b"
    assert expire_on(c, "a") == T0 + 7
    assert expire_on(c, "b") == T0 + 7


def test_read_cb_update_with_expire_on_then_expires(make):
    calls = []

    def read_cb(ctx, key):
        calls.append(key)
        return fastmmap.Update(len(calls), expire_on=T0 + 20)

    c = make(read_cb=read_cb)
    assert c.get("k") == 1
    c._set_time_override(T0 + 19)
    assert c.get("k") == 1
    c._set_time_override(T0 + 20)
    assert c.get("k") == 2
    assert calls == ["k", "k"]


def test_read_cb_plain_value_keeps_the_default_expiry(make):
    c = make(expire_time=100, read_cb=lambda ctx, key: "v")
    c.get("k")
    assert expire_on(c, "k") == T0 + 100


def test_read_cb_update_of_none_is_not_found(make):
    c = make(read_cb=lambda ctx, key: fastmmap.Update(None, expire_time=5))
    assert c.get("k", "dflt") == "dflt"
    assert "k" not in c
    c2 = make(read_cb=lambda ctx, key: fastmmap.Update(None, expire_time=5), cache_not_found=True)
    assert c2.get("k", "dflt") is None
    assert expire_on(c2, "k") == T0 + 5


def test_read_cb_allow_recursive_update(make):
    c = make(read_cb=lambda ctx, key: fastmmap.Update("v", expire_time=4), allow_recursive=True)
    assert c.get("k") == "v"
    assert expire_on(c, "k") == T0 + 4
