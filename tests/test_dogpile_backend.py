"""fastmmap.contrib.dogpile: dogpile.cache's "fastmmap" backend.

dogpile's own generic suites (dogpile.testing) run against it in
``make test-upstream``; here: the entry point, values and the dogpile lock
shared across processes (one process runs the creator while the others
wait, or get the old value), a lock whose holder was killed, values too
large for a page, and bad arguments.
"""

from __future__ import annotations

import os
import threading

import pytest

pytest.importorskip("dogpile.cache")

from dogpile.cache import make_region  # noqa: E402
from dogpile.cache.api import NO_VALUE  # noqa: E402

import fastmmap  # noqa: E402
from fastmmap.contrib.dogpile import FastMmapBackend, FastMmapMutex  # noqa: E402


def _region(path, **arguments):
    arguments.setdefault("cache_size", "1m")
    return make_region().configure("fastmmap", expiration_time=600, arguments={"filename": str(path), **arguments})


def _read_byte(fd):
    data = os.read(fd, 1)
    assert data, "the other side closed the pipe"


def test_entry_point_and_shared_values(tmp_path, forked):
    region = _region(tmp_path / "r.cache")
    assert isinstance(region.backend, FastMmapBackend)
    assert region.get("k") is NO_VALUE

    def child():
        _region(tmp_path / "r.cache").set("k", {"pid": os.getpid()})
        return os.getpid()

    pid = forked(child)
    assert region.get("k") == {"pid": pid}
    region.set_multi({"a": 1, "b": [2]})
    assert region.get_multi(["a", "b", "c"]) == [1, [2], NO_VALUE]
    region.delete_multi(["a", "b"])
    assert region.get_multi(["a", "b"]) == [NO_VALUE, NO_VALUE]
    # the backend's values are dogpile's bytes, as they are in the file
    with fastmmap.Cache(str(tmp_path / "r.cache"), serializer="raw") as raw:
        assert isinstance(raw.get("k"), bytes)


@pytest.mark.timeout(120)
def test_one_process_creates_while_the_others_wait(tmp_path, forked):
    """The dogpile lock is shared: with no value yet, one process runs the
    creator, and the processes that ask meanwhile wait for its value
    instead of running the creator too."""
    path = tmp_path / "r.cache"
    counter = fastmmap.Cache(str(tmp_path / "count.cache"), cache_size="64k")
    started_r, started_w = os.pipe()
    go_r, go_w = os.pipe()
    asking_r, asking_w = os.pipe()

    def creator():
        counter.get_and_set("runs", lambda _k, n: (n or 0) + 1)
        os.write(started_w, b"s")
        _read_byte(go_r)  # hold the lock until the test lets go
        return {"by": os.getpid()}

    def first():
        return _region(path).get_or_create("k", creator)

    def other():
        region = _region(path)
        os.write(asking_w, b"a")
        return region.get_or_create("k", creator)

    a = forked.start(first)
    _read_byte(started_r)  # a runs the creator, under the lock
    region = _region(path)
    mutex = region.backend.get_mutex("k")
    assert mutex.locked()
    assert not mutex.acquire(False)  # held by the other process
    others = [forked.start(other) for _ in range(3)]
    for _ in others:
        _read_byte(asking_r)
    os.write(go_w, b"g" * 4)  # enough for a creator run by every child
    value = a.result()
    assert value["by"] != os.getpid()
    assert [child.result() for child in others] == [value] * 3
    assert counter.get("runs") == 1
    assert region.get("k") == value
    assert not mutex.locked()
    counter.close()


@pytest.mark.timeout(120)
def test_old_value_served_while_another_process_regenerates(tmp_path, forked):
    path = tmp_path / "r.cache"
    region = _region(path)
    region.set("k", "old")
    held_r, held_w = os.pipe()
    go_r, go_w = os.pipe()

    def holder():
        mutex = _region(path).backend.get_mutex("k")
        assert mutex.acquire(False)
        os.write(held_w, b"h")
        _read_byte(go_r)
        mutex.release()

    child = forked.start(holder)
    _read_byte(held_r)
    region.invalidate(hard=False)  # "k" is now stale: regenerate it

    def must_not_run():
        raise AssertionError("the creator ran while another process held the lock")

    # another process regenerates: this one gets the old value at once
    assert region.get_or_create("k", must_not_run) == "old"
    os.write(go_w, b"g")
    child.result()
    assert region.get_or_create("k", lambda: "new") == "new"


@pytest.mark.timeout(120)
def test_lock_of_a_killed_holder_expires(tmp_path, forked):
    path = tmp_path / "r.cache"

    def holder():
        assert _region(path, lock_timeout=1).backend.get_mutex("k").acquire(False)
        os._exit(0)  # dies holding the lock

    forked.start(holder).wait()
    mutex = _region(path, lock_timeout=1).backend.get_mutex("k")
    assert mutex.locked()
    assert mutex.acquire()  # waits until the lease expires
    mutex.release()
    assert not mutex.locked()


def test_mutex_semantics(tmp_path):
    backend = _region(tmp_path / "r.cache").backend
    m1, m2 = backend.get_mutex("a"), backend.get_mutex("b")
    assert isinstance(m1, FastMmapMutex)
    assert m1.acquire() and not m1.acquire(False)
    assert m2.acquire(False)  # other keys stay free, whatever their page
    assert not backend.get_mutex("a").acquire(False)
    # dogpile's async_creation_runner releases in another thread
    t = threading.Thread(target=m1.release)
    t.start()
    t.join()
    assert not m1.locked() and m2.locked()
    m2.release()
    with pytest.raises(RuntimeError, match="does not hold"):
        m2.release()


def test_release_does_not_drop_a_lock_retaken_after_expiry(tmp_path):
    """A holder whose lease expired and was taken by another caller does
    not remove the new holder's lease when it releases."""
    backend = _region(tmp_path / "r.cache").backend
    old, new = backend.get_mutex("k"), backend.get_mutex("k")
    assert old.acquire(False)
    backend.cache.remove(backend.lock_prefix + "k")  # what the lease's expiry does
    assert new.acquire(False)
    old.release()
    assert new.locked() and not backend.get_mutex("k").acquire(False)
    new.release()


def test_value_too_large_for_a_page(tmp_path):
    region = _region(tmp_path / "r.cache", cache_size=None, page_size="64k", num_pages=3)
    region.set("k", "small")
    region.set("k", b"x" * 100_000)  # does not fit: not stored, old value gone
    assert region.get("k") is NO_VALUE
    runs = []

    def big():
        runs.append(1)
        return b"y" * 100_000

    assert region.get_or_create("big", big) == b"y" * 100_000
    assert region.get_or_create("big", big) == b"y" * 100_000
    assert len(runs) == 2  # never cached: created on every call


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="filename"):
        make_region().configure("fastmmap", arguments={})
    with pytest.raises(TypeError, match="cache_szie"):
        _region(tmp_path / "r.cache", cache_szie="1m")
    with pytest.raises(ValueError, match="lock_timeout"):
        _region(tmp_path / "r.cache", lock_timeout=0)
    with pytest.raises(ValueError, match="lock_sleep"):
        _region(tmp_path / "r.cache", lock_sleep="fast")
    assert not (tmp_path / "r.cache").exists()  # refused before the file was created
    arguments = {"filename": str(tmp_path / "r.cache"), "cache_size": "1m", "lock_timeout": 5}
    copy = dict(arguments)
    region = make_region().configure("fastmmap", arguments=arguments)
    assert arguments == copy  # dogpile's own suite checks this too
    assert region.backend.lock_timeout == 5
