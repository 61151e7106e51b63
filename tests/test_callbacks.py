"""Backing-store callbacks (Cache::FastMmap t/4, 5, 7, 10, 11, 15, 22).

read_cb(context, key), write_cb(context, key, value, expire_on) and
delete_cb(context, key) connect the cache to a slower store; write_action
chooses write-through (every set writes at once) or write-back (sets only
mark entries dirty; they are written when evicted, expired or emptied).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import fastmmap

pytestmark = pytest.mark.timeout(60)

T0 = 1_700_000_000


class Store:
    """A dict standing in for a database; logs every callback."""

    def __init__(self, data=None):
        self.data = dict(data or {})
        self.reads = []
        self.writes = []  # (key, value, expire_on)
        self.deletes = []

    def read(self, context, key):
        assert context is self
        self.reads.append(key)
        return self.data.get(key)

    def write(self, context, key, value, expire_on):
        assert context is self
        self.writes.append((key, value, expire_on))
        self.data[key] = value

    def delete(self, context, key):
        assert context is self
        self.deletes.append(key)
        self.data.pop(key, None)

    def calls(self):
        return len(self.reads) + len(self.writes) + len(self.deletes)


@pytest.fixture
def backed(cache):
    """backed(store=None, **options) -> (cache, store) with all three callbacks wired."""

    def make(store=None, **opts):
        store = store if store is not None else Store()
        c = cache(context=store, read_cb=store.read, write_cb=store.write, delete_cb=store.delete, **opts)
        return c, store

    return make


# ---------------------------------------------------------------- read-through


def test_read_through_stores_a_found_value(backed):
    c, store = backed(Store({"k": {"from": "store"}, "b": b"raw"}))
    assert c.get("k") == {"from": "store"}
    assert store.reads == ["k"]
    assert c.get("k") == {"from": "store"}  # now a hit
    assert c["k"] == {"from": "store"}
    assert store.reads == ["k"]
    assert c.exists("k")
    assert c["b"] == b"raw"  # [] reads through too
    assert store.reads == ["k", "b"]
    assert store.writes == []  # read-through stores are not written back


def test_read_through_miss_is_not_cached_by_default(backed):
    c, store = backed()
    assert c.get("nope") is None
    assert c.get("nope", "dflt") == "dflt"
    with pytest.raises(KeyError):
        c["nope"]
    assert store.reads == ["nope"] * 3
    assert not c.exists("nope")


def test_read_cb_not_called_by_exists_in_multi_get_or_get_keys(backed):
    c, store = backed(Store({"k": 1}))
    assert not c.exists("k")
    assert "k" not in c
    assert c.multi_get("pk", ["k"]) == {}
    assert c.get_keys(2) == []
    assert store.reads == []


@pytest.mark.parametrize("write_action", ["write_through", "write_back"])
def test_t10_cache_not_found_caches_none(backed, write_action):
    c, store = backed(cache_not_found=True, write_action=write_action)
    for _ in range(3):
        assert c.get("missing1") is None
        assert c.get("missing2", "dflt") is None  # None is a stored value now
    assert store.reads == ["missing1", "missing2"]  # read_cb ran once per key
    assert c.exists("missing1") and c.exists("missing2")
    c.set("real", 5)
    c.empty()
    # only "real" is written (at once, or by empty()), never the cached misses
    assert [w[0] for w in store.writes] == ["real"]
    assert store.data == {"real": 5}


def test_t15_cache_not_found_with_pickled_values(backed):
    c, store = backed(Store({"a": {"x": [1, 2]}, "b": {"y": (3,)}}), cache_not_found=True, write_action="write_back")
    for _ in range(2):
        assert c.get("a") == {"x": [1, 2]}
        assert c.get("b") == {"y": (3,)}
        assert c.get("c") is None
    assert store.reads == ["a", "b", "c"]
    c.set("d", {"z": None})
    c.empty()
    assert store.data == {"a": {"x": [1, 2]}, "b": {"y": (3,)}, "d": {"z": None}}


def test_read_cb_receives_the_key_as_given(backed):
    c, store = backed(Store({"s": 1, b"b": 2}))
    assert c.get("s") == 1
    assert c.get(b"b") == 2
    assert store.reads == ["s", b"b"]
    assert type(store.reads[1]) is bytes


# ---------------------------------------------------------------- write-through


def test_write_through_calls_write_cb_at_once(backed):
    c, store = backed()
    c._set_time_override(T0)
    assert c.set("k", {"v": 1}) is True
    assert store.writes == [("k", {"v": 1}, 0)]
    c.set("t", "ttl", expire_time=100)
    assert store.writes[-1] == ("t", "ttl", T0 + 100)
    c["x"] = b"bytes"
    assert store.writes[-1] == ("x", b"bytes", 0)
    assert c.get_and_set("n", lambda k, v: (v or 0) + 1) == 1
    assert store.writes[-1] == ("n", 1, 0)
    assert c.add("n", 5) is False  # not stored: not written
    assert store.writes[-1] == ("n", 1, 0)
    assert c.add("a", 5) is True
    assert store.writes[-1] == ("a", 5, 0)
    assert store.data == {"k": {"v": 1}, "t": "ttl", "x": b"bytes", "n": 1, "a": 5}


def test_multi_set_and_multi_get_call_no_callbacks(backed):
    c, store = backed()
    c.multi_set("pk", {"a": 1, "b": 2})
    assert c.multi_get("pk", ["a", "b", "c"]) == {"a": 1, "b": 2}
    assert store.calls() == 0


def test_t5_write_through_3000_sets(backed):
    c, store = backed(num_pages=89, page_size="2k")
    expected = {f"key{i}": f"value {i} " * 3 for i in range(3000)}
    for k, v in expected.items():
        assert c.set(k, v) is True
    assert store.data == expected  # every set reached the store
    assert len(store.writes) == 3000
    assert 500 < len(c) < 3000  # the cache evicted, but holds a good share
    for k, v in expected.items():
        assert c.get(k) == v  # hits, or read through from the store
    assert 0 < len(store.reads) < 3000
    assert len(store.writes) == 3000  # evicting clean entries writes nothing


def test_write_cb_may_use_the_cache(backed, cache):
    """write_cb and delete_cb run after the page is unlocked."""
    seen = []

    def write(ctx, key, value, expire_on):
        seen.append(("w", key, c.get(key), c.exists(key)))

    def delete(ctx, key):
        seen.append(("d", key, c.get(key), c.exists(key)))

    c = cache(num_pages=1, lock_timeout=1, write_cb=write, delete_cb=delete)
    c.set("k", 1)
    c.remove("k")
    assert seen == [("w", "k", 1, True), ("d", "k", None, False)]


# ---------------------------------------------------------------- delete_cb


def test_remove_and_del_call_delete_cb(backed):
    c, store = backed()
    c.set("a", 1)
    c.set("b", 2)
    assert c.remove("a") is True
    assert store.deletes == ["a"]
    del c["b"]
    assert store.deletes == ["a", "b"]
    assert store.data == {}
    assert not c.exists("a") and not c.exists("b")


# ---------------------------------------------------------------- write-back


def test_t4_write_back_keeps_sets_in_the_cache_until_empty(backed):
    c, store = backed(write_action="write_back", num_pages=17, page_size="64k")
    expected = {f"k{i}": {"i": i} for i in range(100)}
    for k, v in expected.items():
        assert c.set(k, v) is True
    assert store.data == {} and store.writes == []  # nothing evicted, nothing written
    assert {k: c.get(k) for k in expected} == expected
    assert store.reads == []

    c.empty()
    assert store.data == expected
    assert len(store.writes) == 100
    assert len(c) == 0

    # read_cb refills from the store
    assert {k: c.get(k) for k in expected} == expected
    assert sorted(store.reads) == sorted(expected)
    assert len(c) == 100

    # entries read through are clean: empty() writes nothing
    writes = len(store.writes)
    c.empty()
    assert len(store.writes) == writes


def test_t4_clear_and_purge_call_no_callbacks(backed):
    c, store = backed(write_action="write_back")
    c._set_time_override(T0)
    c.set("dirty", 1)
    c.set("dirty-expiring", 2, expire_time=5)
    c._set_time_override(T0 + 10)
    c.purge()
    assert not c.exists("dirty-expiring")
    assert c.exists("dirty")
    c.clear()
    assert len(c) == 0
    assert store.calls() == 0
    assert store.data == {}  # the dirty values were dropped, as in Perl


def test_t7_write_back_evictions_are_written(backed, rand):
    c, store = backed(write_action="write_back", num_pages=3, page_size="1k")
    latest = {}
    for i in range(3000):
        k = f"k{rand.randrange(400)}"
        v = f"v{i}-{rand.word()}"
        assert c.set(k, v) is True
        latest[k] = v
    assert store.writes, "a 3 KB cache must have evicted dirty entries"
    cached = dict(c.items())
    assert cached, "the cache keeps some entries"
    assert len(cached) < len(latest)
    # every value is in the cache or the store, and it is the latest one
    for k, v in latest.items():
        assert cached.get(k, store.data.get(k)) == v, k
    assert store.reads == []

    # removing calls delete_cb and the value is written nowhere afterwards
    removed = sorted(latest)[:50]
    for k in removed:
        c.remove(k)
        del latest[k]
    assert store.deletes == removed

    c.empty()
    assert store.data == latest
    assert len(c) == 0


def test_write_back_eviction_keeps_key_types(backed):
    c, store = backed(write_action="write_back", num_pages=1, page_size="1k")
    for i in range(40):
        c.set(f"s{i}", "x" * 30)
        c.set(f"b{i}".encode(), b"y" * 30)
    c.empty()
    assert set(store.data) == {f"s{i}" for i in range(40)} | {f"b{i}".encode() for i in range(40)}


def test_write_back_too_big_value_goes_straight_to_the_store(backed):
    c, store = backed(write_action="write_back", num_pages=1, page_size="4k")
    big = "x" * 10000
    assert c.set("big", big) is False
    assert store.writes == [("big", big, 0)]
    assert not c.exists("big")


def test_write_back_lock_block_and_get_and_set_are_dirty(backed):
    c, store = backed(write_action="write_back")
    with c.lock("l") as e:
        e.value = "locked"
    assert c.get_and_set("g", lambda k, v: "gs") == "gs"
    assert c.add("a", "added") is True
    assert store.writes == []
    c.empty()
    assert store.data == {"l": "locked", "g": "gs", "a": "added"}


def test_t22_expire_writes_back_a_dirty_value(backed):
    c, store = backed(write_action="write_back")
    c._set_time_override(T0)
    c.set("k", {"serialized": [1, 2]}, expire_time=60)
    c.set("s", "plain")
    c.expire("k")
    assert store.writes == [("k", {"serialized": [1, 2]}, T0 + 60)]
    assert not c.exists("k")
    c.expire("s")
    assert store.writes[-1] == ("s", "plain", 0)
    # a clean entry (read through) is not written again
    assert c.get("k") == {"serialized": [1, 2]}
    n = len(store.writes)
    c.expire("k")
    assert len(store.writes) == n
    assert not c.exists("k")
    # expiring an absent key is harmless
    c.expire("absent")
    assert len(store.writes) == n


def test_t22_expire_writes_back_an_already_expired_dirty_value(backed):
    c, store = backed(write_action="write_back")
    c._set_time_override(T0)
    c.set("k", "v", expire_time=5)
    c._set_time_override(T0 + 10)
    c.expire("k")
    assert store.writes == [("k", "v", T0 + 5)]


def test_t22_empty_only_expired_writes_back_expired_dirty_entries(backed):
    c, store = backed(write_action="write_back")
    c._set_time_override(T0)
    c.set("old", "o", expire_time=10)
    c.set("young", "y", expire_time=1000)
    c.set("forever", "f")
    c._set_time_override(T0 + 20)
    c.empty(True)
    assert store.writes == [("old", "o", T0 + 10)]
    assert sorted(c.keys()) == ["forever", "young"]
    c.empty()
    assert store.data == {"old": "o", "young": "y", "forever": "f"}


def test_t22_get_on_an_expired_dirty_key_does_not_lose_it(backed):
    c, store = backed(write_action="write_back")
    c._set_time_override(T0)
    c.set("k", {"dirty": True}, expire_time=10)
    c._set_time_override(T0 + 20)
    assert c.get("k") is None  # expired: a miss (read_cb finds nothing)
    assert store.reads == ["k"]
    assert not c.exists("k")
    assert store.writes == []
    c.empty(True)
    assert store.writes == [("k", {"dirty": True}, T0 + 10)]


@pytest.mark.parametrize("case", ["store-has-an-older-value", "cache_not_found"])
def test_t22_read_through_over_an_expired_dirty_key_does_not_lose_it(backed, case):
    """The miss on an expired dirty key reads through; whatever read_cb returns
    (an older value from the store, or None cached with cache_not_found) must
    not replace the dirty value without it ever reaching the store."""
    if case == "cache_not_found":
        c, store = backed(write_action="write_back", cache_not_found=True)
    else:
        c, store = backed(Store({"k": "older"}), write_action="write_back")
    c._set_time_override(T0)
    c.set("k", "newer", expire_time=10)
    c._set_time_override(T0 + 20)
    c.get("k")
    c.empty()
    assert ("k", "newer", T0 + 10) in store.writes
    assert store.data["k"] == "newer"


# ---------------------------------------------------------------- empty_on_exit


@pytest.mark.multiprocess
def test_t7_empty_on_exit_flushes_at_close_in_the_creator_only(backed, forked):
    c, store = backed(write_action="write_back", empty_on_exit=True)
    expected = {f"k{i}": i for i in range(50)}
    for k, v in expected.items():
        c.set(k, v)

    def child():
        c.close()  # not the creating process: nothing is flushed
        return len(store.writes)

    assert forked(child) == 0
    assert len(c) == 50  # the child did not empty the shared cache
    assert store.writes == []
    c.close()
    assert store.data == expected


def test_without_empty_on_exit_close_writes_nothing(backed):
    c, store = backed(write_action="write_back")
    c.set("k", 1)
    c.close()
    assert store.writes == []


def test_t7_empty_on_exit_at_interpreter_exit_for_two_caches(tmp_path):
    out = tmp_path / "written.txt"
    script = textwrap.dedent(
        """
        import sys
        import fastmmap

        out, d = sys.argv[1], sys.argv[2]

        def write(ctx, key, value, expire_on):
            with open(out, "a") as f:
                f.write(f"{ctx}:{key}={value}\\n")

        caches = []
        for name in ("a", "b"):
            c = fastmmap.Cache(f"{d}/{name}.fmm", write_action="write_back", write_cb=write,
                               context=name, empty_on_exit=True)
            c.set(name + "1", "x")
            c.set(name + "2", "y")
            caches.append(c)
        # no close(): the atexit hook flushes both
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", script, str(out), str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    lines = sorted(out.read_text().splitlines())
    assert lines == ["a:a1=x", "a:a2=y", "b:b1=x", "b:b2=y"]
    assert not os.path.exists(tmp_path / "a.fmm")  # and the files were unlinked


# ---------------------------------------------------------------- recursion (t/11)


def test_t11_read_cb_using_the_cache_raises_recursive_lock_error(cache):
    calls = []

    def read(ctx, key):
        calls.append(key)
        return c.get(key)  # the same key: its page is locked during read_cb

    c = cache(num_pages=1, lock_timeout=1, read_cb=read)
    with pytest.raises(fastmmap.RecursiveLockError, match="already locked"):
        c.get("k")
    assert issubclass(fastmmap.RecursiveLockError, fastmmap.Error)
    assert calls == ["k"]
    # the lock was released on the way out
    assert c.set("k", 1) is True
    assert c.get("k") == 1


def test_t11_allow_recursive(cache):
    def read(ctx, key):
        if key.endswith("-inner"):
            return "base"
        assert not c.exists(key)  # the same key's page is usable
        c.set(key + "-seen", True)
        return c.get(key + "-inner") + "!"

    c = cache(num_pages=1, lock_timeout=1, read_cb=read, allow_recursive=True)
    assert c.get("k") == "base!"
    assert c.get("k-seen") is True
    assert c.get("k-inner") == "base"
    assert c.get("k") == "base!"
    assert sorted(c.keys()) == ["k", "k-inner", "k-seen"]


def test_t11_recursive_set_without_allow_recursive(cache):
    def read(ctx, key):
        c.set(key + "-seen", True)  # another key of the same (only) page
        return "never"

    c = cache(num_pages=1, lock_timeout=1, read_cb=read)
    with pytest.raises(fastmmap.RecursiveLockError):
        c.get("k")
    assert not c.exists("k") and not c.exists("k-seen")
    c.set("k", "ok")
    assert c.get("k") == "ok"
