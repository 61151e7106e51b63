"""Page locks: released on every exception path (Cache::FastMmap t/24), the
cache.lock()/cache.page() context managers, and the atomic operations
get_and_set, touch and add.

The caches here have one page (every key shares the lock) and lock_timeout=1,
so a leaked lock makes the next operation from another thread raise
LockTimeout instead of hanging, and from the same thread RecursiveLockError.
"""

from __future__ import annotations

import pickle
import threading
import time

import pytest

import fastmmap
from _helpers import run_threads as _run_threads

pytestmark = pytest.mark.timeout(60)

T0 = 1_700_000_000
THREAD_TIMEOUT = 30.0


class Boom(Exception):
    pass


def run_threads(target, n, *, timeout=THREAD_TIMEOUT):
    _run_threads(target, n, timeout=timeout)


def assert_unlocked(c, key):
    """The page of key is free, for this thread and for another one, at once."""
    c.exists(key)  # RecursiveLockError if this thread still holds the page
    with c.lock(key):
        pass
    run_threads(lambda i: (c.exists(key), c.get_keys(0)), 1)  # LockTimeout after 1 s if leaked


@pytest.fixture
def one_page(cache):
    def make(**opts):
        return cache(**{"num_pages": 1, "page_size": "64k", "lock_timeout": 1, **opts})

    return make


# ---------------------------------------------------------------- t/24: exception paths


def test_get_and_set_fn_raising(one_page):
    c = one_page()
    c.set("k", "old")

    def fn(key, old):
        raise Boom("in fn")

    with pytest.raises(Boom, match="in fn"):
        c.get_and_set("k", fn)
    assert_unlocked(c, "k")
    assert c.get("k") == "old"
    assert c.get_and_set("k", lambda k, v: v + "+new") == "old+new"


def test_get_and_set_fn_returning_an_unserializable_value(one_page):
    c = one_page()
    c.set("k", 1)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        c.get_and_set("k", lambda k, v: lambda: None)
    assert_unlocked(c, "k")
    assert c.get("k") == 1


def test_get_and_set_fn_using_the_cache(one_page):
    c = one_page()
    with pytest.raises(fastmmap.RecursiveLockError):
        c.get_and_set("k", lambda k, v: c.get("other"))
    assert_unlocked(c, "k")
    assert not c.exists("k")


@pytest.mark.parametrize("allow_recursive", [False, True])
def test_read_cb_raising(one_page, allow_recursive):
    fail = [True]

    def read(ctx, key):
        if fail[0]:
            raise Boom("in read_cb")
        return "loaded"

    c = one_page(read_cb=read, allow_recursive=allow_recursive)
    with pytest.raises(Boom, match="in read_cb"):
        c.get("k")
    assert_unlocked(c, "k")
    with pytest.raises(Boom):
        c["k"]
    assert_unlocked(c, "k")
    assert not c.exists("k")
    fail[0] = False
    assert c.get("k") == "loaded"
    assert c.exists("k")


@pytest.mark.parametrize("allow_recursive", [False, True])
def test_read_cb_raising_after_using_the_cache(one_page, allow_recursive):
    def read(ctx, key):
        try:
            c.set(key + "-side", 1)
        except fastmmap.RecursiveLockError:
            pass
        raise Boom

    c = one_page(read_cb=read, allow_recursive=allow_recursive)
    with pytest.raises(Boom):
        c.get("k")
    assert_unlocked(c, "k")
    assert c.exists("k-side") is allow_recursive


def make_codec():
    state = {"fail_loads": False, "fail_dumps": False}

    def dumps(obj):
        if state["fail_dumps"]:
            raise Boom("in dumps")
        return pickle.dumps(obj)

    def loads(data):
        if state["fail_loads"]:
            raise Boom("in loads")
        return pickle.loads(data)

    return state, (dumps, loads)


def test_custom_loads_raising_in_get_and_multi_get(one_page):
    state, codec = make_codec()
    c = one_page(serializer=codec)
    c.set("k", {"a": 1})
    c.multi_set("pk", {"x": [1], "y": [2]})
    state["fail_loads"] = True
    with pytest.raises(Boom, match="in loads"):
        c.get("k")
    assert_unlocked(c, "k")
    with pytest.raises(Boom, match="in loads"):
        c.multi_get("pk", ["x", "y"])
    assert_unlocked(c, "pk")
    with pytest.raises(Boom, match="in loads"):
        c.get_and_set("k", lambda k, v: v)
    assert_unlocked(c, "k")
    with pytest.raises(Boom, match="in loads"):
        c.get_keys(2)
    assert_unlocked(c, "k")
    with pytest.raises(Boom, match="in loads"):
        with c.lock("k") as e:
            e.value
    assert_unlocked(c, "k")
    state["fail_loads"] = False
    assert c.get("k") == {"a": 1}
    assert c.multi_get("pk", ["x", "y"]) == {"x": [1], "y": [2]}


def test_custom_dumps_raising_in_set_and_multi_set(one_page):
    state, codec = make_codec()
    c = one_page(serializer=codec)
    c.set("k", {"old": 1})
    c.multi_set("pk", {"x": "old"})
    state["fail_dumps"] = True
    with pytest.raises(Boom, match="in dumps"):
        c.set("k", {"new": 1})
    assert_unlocked(c, "k")
    with pytest.raises(Boom, match="in dumps"):
        c.multi_set("pk", {"x": "str is native", "y": {"new": 1}})
    assert_unlocked(c, "pk")
    with pytest.raises(Boom, match="in dumps"):
        c.get_and_set("k", lambda k, v: {"new": 2})
    assert_unlocked(c, "k")
    with pytest.raises(Boom, match="in dumps"):
        with c.page("pk") as p:
            p["y"] = {"new": 3}
    assert_unlocked(c, "pk")
    state["fail_dumps"] = False
    assert c.get("k") == {"old": 1}
    assert c.multi_get("pk", ["x", "y"]) == {"x": "old"}
    assert c.set("k", {"new": 4}) is True
    assert c.get("k") == {"new": 4}


def test_custom_decompress_raising(one_page):
    fail = [False]

    def decompress(data):
        if fail[0]:
            raise Boom("in decompress")
        return data[1:]

    c = one_page(compressor=(lambda b: b"Z" + b[: len(b) // 2], decompress), compress_threshold=0)
    c.set("k", "x" * 100)
    fail[0] = True
    with pytest.raises(Boom):
        c.get("k")
    assert_unlocked(c, "k")


def test_write_cb_raising_in_set(one_page):
    fail = [True]
    written = []

    def write(ctx, key, value, expire_on):
        if fail[0]:
            raise Boom("in write_cb")
        written.append((key, value))

    c = one_page(write_cb=write)
    with pytest.raises(Boom, match="in write_cb"):
        c.set("k", 1)
    assert_unlocked(c, "k")
    with pytest.raises(Boom):
        c["k"] = 2
    assert_unlocked(c, "k")
    with pytest.raises(Boom):
        c.get_and_set("k", lambda k, v: 3)
    assert_unlocked(c, "k")
    with pytest.raises(Boom):
        with c.lock("k") as e:
            e.value = 4
    assert_unlocked(c, "k")
    fail[0] = False
    assert c.set("k", 5) is True
    assert c.get("k") == 5
    assert written == [("k", 5)]


def test_write_cb_raising_on_write_back_eviction(cache):
    def write(ctx, key, value, expire_on):
        raise Boom("in write_cb")

    c = cache(num_pages=1, page_size="1k", lock_timeout=1, write_action="write_back", write_cb=write)
    # a page full of dirty entries: putting the refused one back loses another
    with pytest.raises((Boom, fastmmap.WriteBackLostError)):
        for i in range(100):
            c.set(f"k{i}", "v" * 50)
    assert_unlocked(c, "k0")
    with pytest.raises(Boom):
        c.empty()
    assert_unlocked(c, "k0")


def test_delete_cb_raising(one_page):
    def delete(ctx, key):
        raise Boom("in delete_cb")

    c = one_page(delete_cb=delete)
    c.set("k", 1)
    with pytest.raises(Boom):
        c.remove("k")
    assert_unlocked(c, "k")
    assert not c.exists("k")


# ---------------------------------------------------------------- cache.lock(key)


def test_lock_entry_basics(one_page):
    c = one_page()
    with c.lock("k") as e:
        assert e.key == "k"
        assert e.value is None
        assert e.exists is False
        e.value = {"a": 1}
        assert e.exists is True
        assert e.value == {"a": 1}
    assert c.get("k") == {"a": 1}

    with c.lock("k") as e:
        e.value = None  # None is a value: the key exists
        assert e.exists is True and e.value is None
    assert c.exists("k") and c.get("k", "dflt") is None

    with c.lock("k") as e:
        assert e.remove() is True
        assert e.exists is False
        assert e.value is None
        assert e.remove() is False
    assert not c.exists("k")


def test_lock_entry_set_with_expiry(one_page):
    c = one_page()
    c._set_time_override(T0)
    with c.lock("k") as e:
        e.set("v", expire_time=10)
    [entry] = c.get_keys(1)
    assert entry["expire_on"] == T0 + 10
    c._set_time_override(T0 + 10)
    assert c.get("k") is None
    with c.lock("k") as e:
        assert not e.exists


def test_lock_entry_outside_its_block(one_page):
    c = one_page()
    with c.lock("k") as e:
        e.value = 1
    with pytest.raises(fastmmap.Error):
        e.value
    with pytest.raises(fastmmap.Error):
        e.value = 2
    assert c.get("k") == 1


def test_atomic_increment_threads(one_page):
    c = one_page(lock_timeout=20)

    def work(i):
        for _ in range(1000):
            with c.lock("hits") as e:
                e.value = (e.value or 0) + 1

    run_threads(work, 4)
    assert c.get("hits") == 4000


@pytest.mark.multiprocess
def test_atomic_increment_processes(one_page, forked):
    c = one_page(lock_timeout=20)

    def work():
        for _ in range(2000):
            with c.lock("hits") as e:
                e.value = (e.value or 0) + 1
        return True

    children = [forked.start(work) for _ in range(2)]
    assert [ch.result() for ch in children] == [True, True]
    assert c.get("hits") == 4000


def test_lock_block_exception_releases_and_keeps_changes(one_page):
    c = one_page()
    c.set("other", "o")
    with pytest.raises(Boom):
        with c.lock("k") as e:
            e.value = "set before the error"
            raise Boom
    assert_unlocked(c, "k")
    assert c.get("k") == "set before the error"
    with pytest.raises(Boom):
        with c.lock("other") as e:
            e.remove()
            raise Boom
    assert_unlocked(c, "other")
    assert not c.exists("other")


def test_cache_calls_inside_a_lock_block_raise(one_page):
    c = one_page()
    with c.lock("k") as e:
        e.value = 1
        with pytest.raises(fastmmap.Error):
            c.get("k")
        with pytest.raises(fastmmap.Error):
            c.set("k", 2)
        with pytest.raises(fastmmap.Error):
            c.get("another key of the same page")
        with pytest.raises(fastmmap.Error):
            with c.lock("k"):
                pass
        assert e.value == 1  # the block still works
        e.value = 3
    assert c.get("k") == 3
    assert_unlocked(c, "k")


def test_write_through_callbacks_run_after_the_lock_block(one_page):
    log = []

    def write(ctx, key, value, expire_on):
        # c.get would raise RecursiveLockError if the page were still locked
        log.append(("write", key, value, c.get(key)))

    def delete(ctx, key):
        log.append(("delete", key, c.exists(key)))

    c = one_page(write_cb=write, delete_cb=delete)
    with c.lock("k") as e:
        e.value = 1
        e.value = 2
        assert log == []
    assert log == [("write", "k", 1, 2), ("write", "k", 2, 2)]
    log.clear()
    with c.lock("k") as e:
        e.remove()
        assert log == []
    assert log == [("delete", "k", False)]


def test_write_back_evictions_from_a_page_block_are_flushed_after_it(cache):
    log = []

    def write(ctx, key, value, expire_on):
        log.append((key, c.exists(key)))  # raises if the page is still locked

    c = cache(num_pages=1, page_size="4k", lock_timeout=1, write_action="write_back", write_cb=write)
    for i in range(20):
        c.set(f"dirty{i}", "d" * 100)
    assert log == []
    with c.page("pk") as p:
        for i in range(40):
            p[f"m{i}"] = "m" * 100
        assert log == []
    assert log, "filling the page must have evicted dirty entries"
    assert {k for k, _ in log} <= {f"dirty{i}" for i in range(20)}
    assert not any(exists for _, exists in log)


# ---------------------------------------------------------------- cache.page(page_key)


def test_page_block_mapping(one_page):
    c = one_page()
    with c.page("pk") as p:
        assert "a" not in p
        assert p.get("a") is None and p.get("a", 5) == 5
        with pytest.raises(KeyError):
            p["a"]
        p["a"] = 1
        p["b"] = {"x": [2]}
        p.set("c", "three")
        assert p["a"] == 1 and p["b"] == {"x": [2]} and p.get("c") == "three"
        assert "a" in p
        del p["a"]
        assert "a" not in p
        with pytest.raises(KeyError):
            del p["a"]
    assert c.multi_get("pk", ["a", "b", "c"]) == {"b": {"x": [2]}, "c": "three"}
    # other page keys do not see them
    assert c.multi_get("other", ["b", "c"]) == {}

    c.multi_set("pk", {"d": 4, "e": b"five"})
    with c.page("pk") as p:
        assert p["d"] == 4 and p["e"] == b"five" and p["b"] == {"x": [2]}
        del p["d"]
    assert c.multi_get("pk", ["d", "e"]) == {"e": b"five"}


def test_page_block_exception_releases_and_keeps_changes(one_page):
    c = one_page()
    with pytest.raises(Boom):
        with c.page("pk") as p:
            p["a"] = 1
            raise Boom
    assert_unlocked(c, "pk")
    assert c.multi_get("pk", ["a"]) == {"a": 1}
    with pytest.raises(KeyError):
        with c.page("pk") as p:
            p["b"] = 2
            p["missing"]
    assert_unlocked(c, "pk")
    assert c.multi_get("pk", ["a", "b"]) == {"a": 1, "b": 2}


def test_cache_calls_inside_a_page_block_raise(one_page):
    c = one_page()
    with c.page("pk") as p:
        p["a"] = 1
        with pytest.raises(fastmmap.Error):
            c.multi_get("pk", ["a"])
        with pytest.raises(fastmmap.Error):
            c.multi_set("pk", {"a": 2})
        with pytest.raises(fastmmap.Error):
            c.get("pk")
        assert p["a"] == 1
    assert c.multi_get("pk", ["a"]) == {"a": 1}


def test_page_block_writes_call_no_callbacks(one_page):
    calls = []
    c = one_page(
        write_cb=lambda *a: calls.append(("w",) + a[1:]),
        delete_cb=lambda *a: calls.append(("d",) + a[1:]),
        read_cb=lambda *a: calls.append(("r",) + a[1:]),
    )
    with c.page("pk") as p:
        p["a"] = 1
        del p["a"]
        assert p.get("zz") is None
    assert calls == []  # like multi_set/multi_get


def test_page_block_threads(one_page):
    c = one_page(lock_timeout=20)

    def work(i):
        for _ in range(300):
            with c.page("pk") as p:
                p["n"] = p.get("n", 0) + 1

    run_threads(work, 3)
    assert c.multi_get("pk", ["n"]) == {"n": 900}


# ---------------------------------------------------------------- get_and_set, touch, add


def test_get_and_set(one_page):
    c = one_page()
    c._set_time_override(T0)
    seen = []

    def fn(key, old):
        seen.append((key, old))
        return (old or 0) + 1

    assert c.get_and_set("n", fn) == 1
    assert c.get_and_set("n", fn) == 2
    assert seen == [("n", None), ("n", 1)]
    assert c.get("n") == 2
    [entry] = c.get_keys(1)
    assert entry["expire_on"] == 0

    assert c.get_and_set("n", fn, expire_time=30) == 3
    [entry] = c.get_keys(1)
    assert entry["expire_on"] == T0 + 30
    assert c.get_and_set("n", fn, expire_time="1m") == 4
    assert c.get_keys(1)[0]["expire_on"] == T0 + 60
    c._set_time_override(T0 + 60)
    assert c.get("n") is None
    assert c.get_and_set("n", fn) == 1  # an expired key reads as None


def test_get_and_set_uses_the_default_expire_time(one_page):
    c = one_page(expire_time=100)
    c._set_time_override(T0)
    c.get_and_set("k", lambda k, v: "v")
    assert c.get_keys(1)[0]["expire_on"] == T0 + 100


def test_touch(one_page):
    c = one_page()
    c._set_time_override(T0)
    c.set("k", {"v": 1}, expire_time=10)
    c._set_time_override(T0 + 5)
    assert c.touch("k", 100) is True
    assert c.get("k") == {"v": 1}
    assert c.get_keys(1)[0]["expire_on"] == T0 + 105
    c._set_time_override(T0 + 50)
    assert c.get("k") == {"v": 1}  # would have expired at T0 + 10
    assert c.touch("k", "never") is True
    c._set_time_override(T0 + 10**6)
    assert c.get("k") == {"v": 1}
    assert c.touch("missing", 10) is False
    assert not c.exists("missing")


def test_touch_expired_key(one_page):
    c = one_page()
    c._set_time_override(T0)
    c.set("k", "v", expire_time=10)
    c._set_time_override(T0 + 20)
    assert c.touch("k", 100) is False
    assert c.get("k") is None


def test_add(one_page):
    c = one_page()
    c._set_time_override(T0)
    assert c.add("k", {"first": 1}) is True
    assert c.add("k", {"second": 2}) is False
    assert c.get("k") == {"first": 1}
    assert c.add("t", "v", expire_time=10) is True
    c._set_time_override(T0 + 10)
    assert c.add("t", "again") is True  # the old entry expired
    assert c.get("t") == "again"
    c.remove("k")
    assert c.add("k", None) is True
    assert c.exists("k") and c.add("k", 1) is False


def test_a_held_page_times_out_with_a_readable_message(one_page):
    """What assert_unlocked relies on: a page held elsewhere gives LockTimeout."""
    c = one_page()
    inside, release = threading.Event(), threading.Event()

    def holder():
        with c.lock("k"):
            inside.set()
            release.wait(THREAD_TIMEOUT)

    t = threading.Thread(target=holder, daemon=True)
    t.start()
    try:
        assert inside.wait(THREAD_TIMEOUT)
        with pytest.raises(fastmmap.LockTimeout) as info:
            c.exists("k")
    finally:
        release.set()
        t.join(THREAD_TIMEOUT)
    message = str(info.value)
    assert "%" not in message, message  # the format string was filled in
    assert "page 0" in message, message
    assert_unlocked(c, "k")


def test_an_abandoned_lock_block_is_released_when_its_cache_is_collected(tmp_path, forked):
    """A lock block entered and never exited, on a cache that is then
    garbage-collected, must not leave the page locked in the file, nor a
    stale record that makes a later cache in this thread refuse to lock."""
    import gc

    path = str(tmp_path / "abandoned.cache")
    c = fastmmap.Cache(path, num_pages=1, page_size="4k", unlink_on_exit=False)
    block = c.lock("k")
    block.__enter__()
    c.close()  # deferred: the page is still held
    del block, c
    gc.collect()
    # same thread, new handle (possibly at the freed handle's address)
    with fastmmap.Cache(path, lock_timeout=1) as c2:
        c2["k"] = 1
        assert c2["k"] == 1
    # another process: the mutex in the file is free
    def child():
        with fastmmap.Cache(path, lock_timeout=1) as c3:
            c3["k"] = 2
            return c3["k"]

    assert forked(child, timeout=30) == 2
