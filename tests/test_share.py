"""Share (IPC::Mmap::Share) and Cache(anonymous=True): shared memory with no file.

Both live in an anonymous shared mapping, so they are shared with the
children forked after they were made, and with nobody else.
"""

from __future__ import annotations

import os
import pickle
import select
import tempfile
import threading
import time

import pytest

import fastmmap

pytestmark = pytest.mark.timeout(60)

CHILD_TIMEOUT = 30.0


@pytest.fixture
def share():
    made = []

    def make(size, **kw):
        s = fastmmap.Share(size, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


class Gate:
    """A one-shot signal between a process and a forked child (a pipe);
    by default from the parent to the child."""

    def __init__(self, opener="the parent"):
        self.r, self.w = os.pipe()
        self.opener = opener

    def open(self):
        os.write(self.w, b"x")

    def wait(self):
        ready, _, _ = select.select([self.r], [], [], CHILD_TIMEOUT)
        assert ready, f"{self.opener} never opened the gate"
        os.read(self.r, 1)

    def close(self):
        os.close(self.r)
        os.close(self.w)


@pytest.fixture
def gate():
    g = Gate()
    yield g
    g.close()


# ---------------------------------------------------------------- Share


def test_share_basics(share):
    s = share(1000)
    assert s.size == 1000
    assert s.get() is None
    for obj in [{"a": [1, 2]}, (1, "x"), "text \u263a", b"bytes", 42, None, {1, 2}]:
        s.set(obj)
        assert s.get() == obj
        assert type(s.get()) is type(obj)


@pytest.mark.parametrize("size", [1, 100, 511, 512, 1000, 4096, 65536, 300_000])
def test_share_holds_exactly_size_bytes(share, size):
    s = share(size)
    s.set(b"x" * size)
    assert s.get() == b"x" * size
    s.set("y" * size)
    assert s.get() == "y" * size
    with pytest.raises(ValueError):
        s.set(b"z" * (size + 1))
    assert s.get() == "y" * size


def test_share_too_big_keeps_the_old_value(share):
    s = share(100)
    s.set({"old": 1})
    big = list(range(100))
    assert len(pickle.dumps(big, pickle.HIGHEST_PROTOCOL)) > 100
    with pytest.raises(ValueError, match="100"):
        s.set(big)
    assert s.get() == {"old": 1}
    with pytest.raises(ValueError):
        s.set("\u00e9" * 51)  # 102 bytes of UTF-8
    assert s.get() == {"old": 1}
    s.set("\u00e9" * 50)  # exactly 100 bytes
    assert s.get() == "\u00e9" * 50
    with s:
        with pytest.raises(ValueError):
            s.set(b"b" * 101)
        assert s.get() == "\u00e9" * 50
    s.set(b"fine")
    assert s.get() == b"fine"


@pytest.mark.parametrize("size", [0, -1, 1.5, True, "10", None])
def test_share_bad_size(size):
    with pytest.raises(ValueError):
        fastmmap.Share(size)


@pytest.mark.multiprocess
def test_share_child_sets_parent_sees(share, forked):
    s = share(1000)
    s.set("before")

    def child():
        old = s.get()
        s.set({"from": "child", "pid": os.getpid()})
        return old

    assert forked(child) == "before"
    got = s.get()
    assert got["from"] == "child" and got["pid"] != os.getpid()


@pytest.mark.multiprocess
def test_share_parent_sets_child_sees(share, forked, gate):
    s = share(1000)
    s.set("before")
    child_read = Gate("the child")

    def child():
        first = s.get()
        child_read.open()
        gate.wait()
        return first, s.get()

    try:
        proc = forked.start(child)
        child_read.wait()  # the parent's set comes after the child's first get
        s.set(["set", "by", "parent"])
        gate.open()
        assert proc.result() == ("before", ["set", "by", "parent"])
    finally:
        child_read.close()


def test_share_lock_unlock(share):
    s = share(1000)
    s.lock()
    s.set(1)
    assert s.get() == 1
    s.lock()  # re-entrant in one thread
    s.set(2)
    s.unlock()
    assert s.get() == 2
    s.unlock()
    with pytest.raises(fastmmap.Error):
        s.unlock()
    with s as same:
        assert same is s
        s.set(s.get() + 1)
        with s:
            s.set(s.get() + 1)
    assert s.get() == 4


@pytest.mark.multiprocess
def test_share_with_block_releases_on_exception(share, forked):
    s = share(1000)
    s.set(0)
    with pytest.raises(RuntimeError):
        with s:
            s.set(1)
            raise RuntimeError
    assert s.get() == 1

    def child():
        with s:
            s.set(s.get() + 1)
        return s.get()

    assert forked(child, timeout=10) == 2


@pytest.mark.multiprocess
def test_share_increment_from_two_processes(share, forked):
    s = share(100)
    s.set(0)

    def work():
        for _ in range(500):
            with s:
                s.set(s.get() + 1)
        return True

    children = [forked.start(work) for _ in range(2)]
    assert [ch.result() for ch in children] == [True, True]
    assert s.get() == 1000


@pytest.mark.multiprocess
def test_share_lock_excludes_another_process(share, forked, gate):
    s = share(100)
    s.set("free")

    def child():
        gate.wait()  # the parent holds the lock now
        t0 = time.monotonic()
        with s:  # waits for the parent's unlock
            return s.get(), time.monotonic() - t0

    proc = forked.start(child)
    with s:
        s.set("parent held")
        gate.open()
        time.sleep(0.2)
        s.set("released")
    value, waited = proc.result()
    assert value == "released"
    assert waited >= 0.1


def test_share_lock_excludes_another_thread(share):
    s = share(100)
    s.set(0)
    result = []

    def reader():
        try:
            result.append(s.get())  # must wait for the unlock, not fail
        except Exception as e:  # noqa: BLE001 - reported below
            result.append(e)

    s.lock()
    try:
        s.set(1)
        t = threading.Thread(target=reader, daemon=True)
        t.start()
        time.sleep(0.1)
        s.set(2)
    finally:
        s.unlock()
    t.join(CHILD_TIMEOUT)
    assert not t.is_alive()
    assert result == [2]


def test_share_close(share):
    s = share(10)
    s.set(1)
    s.close()
    with pytest.raises(ValueError):
        s.get()


# ---------------------------------------------------------------- Cache(anonymous=True)


def temp_dirs():
    dirs = {"/dev/shm", tempfile.gettempdir()}
    return sorted(d for d in dirs if os.path.isdir(d))


def our_temp_entries():
    """Entries in the temp dirs that this library would create (fastmmap-*, sharefile*)."""
    return {
        (d, name) for d in temp_dirs() for name in os.listdir(d) if name.startswith(("fastmmap", "sharefile"))
    }


def referenced_files():
    """Paths this process has open or mapped."""
    paths = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6:
                paths.add(parts[5].strip())
    return paths


@pytest.mark.multiprocess
def test_anonymous_cache_uses_no_file(cache, forked, gate):
    before_entries = our_temp_entries()
    before_refs = referenced_files()

    c = cache(None, anonymous=True, num_pages=3, page_size="4k")
    assert c.share_file is None
    c.set("parent", {"a": 1})

    def child():
        c.set("child", [1, 2])
        gate.wait()
        return c.get("late")

    proc = forked.start(child)
    deadline = time.monotonic() + CHILD_TIMEOUT
    while not c.exists("child"):
        assert time.monotonic() < deadline, "the child's write never arrived"
        time.sleep(0.001)
    assert c.get("child") == [1, 2]
    c.set("late", "set after the fork")
    gate.open()
    assert proc.result() == "set after the fork"

    new_refs = {p for p in referenced_files() - before_refs if p.startswith(tuple(temp_dirs()))}
    assert new_refs == set()
    assert our_temp_entries() == before_entries
    c.close()
    assert our_temp_entries() == before_entries


def test_anonymous_cache_is_private_to_its_handle(cache):
    a = cache(None, anonymous=True)
    b = cache(None, anonymous=True)
    a.set("k", 1)
    assert b.get("k") is None


def test_anonymous_cache_cannot_be_pickled(cache):
    c = cache(None, anonymous=True)
    with pytest.raises(TypeError, match="anonymous"):
        pickle.dumps(c)


def test_anonymous_cache_with_a_share_file_is_an_error(cache):
    with pytest.raises(ValueError):
        cache(cache.path(), anonymous=True)
    assert not os.path.exists(cache.path("cache-1.fmm"))
