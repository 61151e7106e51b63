"""A write_cb that raises during write-back loses nothing silently.

In write-back mode a dirty entry leaves the cache (expire(), empty(),
eviction by a store, empty_on_exit at close) before write_cb sees it.  When
write_cb raises, the entry goes back into the cache, still dirty, and the
exception reaches the caller; an entry that cannot be put back is named by
a WriteBackLostError.  Every test runs against both file formats.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest

import fastmmap
from fastmmap import _fastmmap as _C

pytestmark = pytest.mark.timeout(60)

T0 = 1_700_000_000


class StoreDown(Exception):
    pass


class Store:
    """A dict standing in for a database whose writes of chosen keys fail
    (all of them with "*")."""

    def __init__(self, fail=()):
        self.data = {}
        self.fail = set(fail)
        self.attempts = []

    def write(self, context, key, value, expire_on):
        self.attempts.append(key)
        if "*" in self.fail or key in self.fail:
            raise StoreDown(f"cannot write {key!r}")
        self.data[key] = (value, expire_on)


@pytest.fixture(params=["native", "perl"])
def make(request, cache):
    """make(store, **options) -> a write-back Cache writing to store, clock at T0."""

    def mk(store, **options):
        if request.param == "perl":
            options = {"format": "perl", "serializer": "raw", **options}
        c = cache(write_action="write_back", write_cb=store.write, **options)
        c._set_time_override(T0)
        return c

    return mk


def dirty(c, key):
    """True if key's live entry is still marked for write-back."""
    return any(
        d["key"] == key and d["flags"] & _C.F_DIRTY for d in c.get_keys(1)
    )


def nothing_lost(c, store, expected):
    """Each value is in the cache or the store."""
    cached = dict(c.items())
    for k, v in expected.items():
        assert cached.get(k, store.data.get(k, (None,))[0]) == v, k


# ---------------------------------------------------------------- expire()


def test_expire_keeps_the_entry_dirty_when_write_cb_raises(make):
    store = Store(fail={"k"})
    c = make(store)
    c.set("k", "v", expire_time=60)
    c.set("m", "w", modseq=7)
    with pytest.raises(StoreDown):
        c.expire("k")
    assert c.get("k") == "v" and dirty(c, "k")
    assert [d["expire_on"] for d in c.get_keys(1) if d["key"] == "k"] == [T0 + 60]
    store.fail = {"m"}
    with pytest.raises(StoreDown):
        c.expire("m")
    assert c.get("m") == "w" and c.get_modseq("m") == 7  # the modseq comes back too
    store.fail = set()
    c.expire("k")
    c.expire("m")
    assert store.data == {"k": ("v", T0 + 60), "m": ("w", 0)}
    assert len(c) == 0


def test_expire_of_an_expired_dirty_entry_keeps_it_for_the_next_flush(make):
    store = Store(fail={"k"})
    c = make(store)
    c.set("k", "v", expire_time=5)
    c._set_time_override(T0 + 10)
    with pytest.raises(StoreDown):
        c.expire("k")
    assert "k" not in c  # expired: invisible, but still there and dirty
    store.fail = set()
    c.empty(only_expired=True)
    assert store.data == {"k": ("v", T0 + 5)}


def test_a_newer_value_stored_by_write_cb_is_not_overwritten(make):
    """write_cb stores a newer value for its key, then raises: the old one
    is not put back over it."""
    c = None

    def write_cb(ctx, key, value, expire_on):
        c.set(key, "newer")
        raise StoreDown(key)

    store = Store()
    store.write = write_cb
    c = make(store)
    c.set("k", "old")
    with pytest.raises(StoreDown):
        c.expire("k")
    assert c.get("k") == "newer"


# ---------------------------------------------------------------- empty()


def test_empty_keeps_what_write_cb_could_not_write(make):
    store = Store(fail={"k7"})
    c = make(store, num_pages=3)
    expected = {f"k{i}": f"v{i}" for i in range(30)}
    for k, v in expected.items():
        c.set(k, v)
    with pytest.raises(StoreDown):
        c.empty()
    assert c.get("k7") == "v7" and dirty(c, "k7")
    nothing_lost(c, store, expected)
    store.fail = set()
    c.empty()
    assert {k: v for k, (v, _) in store.data.items()} == expected
    assert len(c) == 0


def test_empty_only_expired_keeps_what_write_cb_could_not_write(make):
    store = Store(fail={"old"})
    c = make(store)
    c.set("old", "o", expire_time=10)
    c.set("young", "y", expire_time=1000)
    c._set_time_override(T0 + 20)
    with pytest.raises(StoreDown):
        c.empty(only_expired=True)
    assert "old" not in c  # expired: invisible, but still there and dirty
    assert c.get("young") == "y"
    store.fail = set()
    c.empty(only_expired=True)
    assert store.data == {"old": ("o", T0 + 10)}


def test_put_back_keeps_the_key_type(make):
    store = Store(fail={"*"})
    c = make(store, num_pages=1)
    c.set("s", "1")
    c.set(b"b", b"2")
    c.set("\u00e9t\u00e9", "3")
    with pytest.raises(StoreDown):
        c.empty()
    assert sorted(map(repr, c.keys())) == sorted(map(repr, ["s", b"b", "\u00e9t\u00e9"]))
    store.fail = set()
    c.empty()
    assert {k: v for k, (v, _) in store.data.items()} == {"s": "1", b"b": b"2", "\u00e9t\u00e9": "3"}


# ---------------------------------------------------------------- eviction


def _store_until_evicted(c, how, victim):
    """Store new keys (by `how`) until victim leaves the cache: the store
    that evicts it raises StoreDown; return the keys stored."""
    stored = []
    for i in range(1000):
        k = f"n{i}"
        stored.append(k)
        try:
            if how == "set":
                c.set(k, "x" * 40)
            elif how == "add":
                c.add(k, "x" * 40)
            elif how == "get_and_set":
                c.get_and_set(k, lambda key, old: "x" * 40)
            else:
                with c.lock(k) as e:
                    e.value = "x" * 40
        except StoreDown:
            return stored
    raise AssertionError("the victim was never evicted")


@pytest.mark.parametrize("how", ["set", "add", "get_and_set", "lock block"])
def test_eviction_puts_back_an_entry_write_cb_refused(make, how):
    store = Store(fail={"victim"})
    c = make(store, num_pages=1, page_size="4k")
    c.set("victim", "precious")
    stored = _store_until_evicted(c, how, "victim")
    assert c.get("victim") == "precious" and dirty(c, "victim")
    # the store that evicted it did store (putting the victim back may have
    # evicted that value in turn: it was then written)
    nothing_lost(c, store, {k: "x" * 40 for k in stored})
    store.fail = set()
    c.empty()
    assert store.data["victim"] == ("precious", 0)


def test_an_entry_that_cannot_be_put_back_is_reported_lost(make):
    """The store is down and the page is full of dirty entries: putting the
    evicted ones back evicts others, which cannot be written either.  Those
    are named, never dropped silently."""
    store = Store(fail={"*"})
    c = make(store, num_pages=1, page_size="4k")
    keys = []
    err = None
    for i in range(1000):
        keys.append(f"k{i}")
        try:
            c.set(keys[-1], "y" * 100)
        except StoreDown:
            continue  # the evicted entries could all be put back
        except fastmmap.WriteBackLostError as e:
            err = e
            break
    assert err is not None, "a 4 KB page cannot keep 1000 dirty entries"
    assert isinstance(err.__cause__, StoreDown)
    assert err.keys and all(k in keys for k in err.keys)
    assert "lost" in str(err) and repr(err.keys[0]) in str(err)
    cached = set(c.keys())
    assert not cached & set(err.keys)
    assert cached | set(err.keys) == set(keys)  # everything else is still cached
    assert store.data == {}


def test_an_entry_whose_page_stays_locked_is_reported_lost(make):
    """Another thread holds the key's page while write_cb fails: the entry
    cannot go back within lock_timeout, and is named as lost."""
    held, release = threading.Event(), threading.Event()
    threads = []

    def holder():
        with c.lock("k"):
            held.set()
            release.wait(30)

    def write_cb(ctx, key, value, expire_on):
        threads.append(threading.Thread(target=holder))
        threads[0].start()
        held.wait(30)
        raise StoreDown(key)

    store = Store()
    store.write = write_cb
    c = make(store, lock_timeout=0.2)
    c.set("k", "v")
    try:
        with pytest.raises(fastmmap.WriteBackLostError) as info:
            c.expire("k")
    finally:
        release.set()
        for t in threads:
            t.join()
    assert info.value.keys == ("k",)
    assert isinstance(info.value.__cause__, StoreDown)
    assert "k" not in c


# ---------------------------------------------------------------- empty_on_exit


def test_close_with_empty_on_exit_raises_and_keeps_the_cache_open(make):
    store = Store(fail={"k"})
    c = make(store, empty_on_exit=True)
    c.set("k", "v")
    c.set("other", "w")
    with pytest.raises(StoreDown):
        c.close()
    assert not c.closed
    assert c.get("k") == "v" and dirty(c, "k")
    store.fail = set()
    c.close()
    assert c.closed
    assert store.data["k"] == ("v", 0) and store.data["other"] == ("w", 0)


@pytest.mark.parametrize("fmt", ["native", "perl"])
def test_empty_on_exit_at_interpreter_exit_reports_and_keeps_the_file(tmp_path, fmt):
    path = tmp_path / "c.fmm"
    script = textwrap.dedent(
        """
        import sys
        import fastmmap

        def write(ctx, key, value, expire_on):
            raise ConnectionError("store down")

        opts = {"format": "perl", "serializer": "raw"} if sys.argv[2] == "perl" else {}
        c = fastmmap.Cache(sys.argv[1], write_action="write_back", write_cb=write,
                           empty_on_exit=True, unlink_on_exit=True, **opts)
        c.set("k", "v")
        # no close(): the atexit hook flushes, and the store is down
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", script, str(path), fmt], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "closing the cache" in r.stderr and "store down" in r.stderr
    assert os.path.exists(path)  # not unlinked: the dirty entry is in it
    written = []
    opts = {"format": "perl", "serializer": "raw"} if fmt == "perl" else {}
    with fastmmap.Cache(
        str(path), write_action="write_back", write_cb=lambda ctx, k, v, e: written.append((k, v)), **opts
    ) as c:
        assert c.get("k") == "v"
        c.empty()
    assert written == [("k", "v")]
