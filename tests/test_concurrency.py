"""Threads and processes sharing one cache; page locks and their failure modes.

Every thread is joined with a timeout and every child process is waited for
with a timeout: a hang fails the test as a "possible deadlock".
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time

import pytest

import fastmmap

THREAD_TIMEOUT = 30.0

pytestmark = pytest.mark.timeout(120)


def run_threads(target, n, *, timeout=THREAD_TIMEOUT):
    """Run target(i) in n threads; re-raise the first exception; fail on a hang."""
    errors = []

    def wrapper(i):
        try:
            target(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=wrapper, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    if alive:
        pytest.fail(f"threads {alive} still running after {timeout}s: possible deadlock")
    if errors:
        raise errors[0]


def incr(key, old):
    return (old or 0) + 1


# ---------------------------------------------------------------- threads


def test_threads_get_and_set_increments_are_exact(cache):
    c = cache(num_pages=3, lock_timeout=20)
    n_threads, n_incr = 8, 1000

    def work(i):
        for _ in range(n_incr):
            c.get_and_set("counter", incr)

    run_threads(work, n_threads)
    assert c["counter"] == n_threads * n_incr


def test_threads_many_counters_across_pages(cache):
    c = cache(num_pages=7, page_size=4096, lock_timeout=20)
    keys = [f"ctr{i}" for i in range(16)]

    def work(i):
        for j in range(400):
            c.get_and_set(keys[(i + j) % len(keys)], incr)

    run_threads(work, 8)
    assert sum(c[k] for k in keys) == 8 * 400


def test_threads_never_see_torn_values(cache):
    c = cache(num_pages=3, lock_timeout=20)
    keys = [f"k{i}" for i in range(8)]
    for k in keys:
        c[k] = (k, -1, b"x" * 50)

    def work(t):
        for i in range(500):
            k = keys[(t * 7 + i) % len(keys)]
            if i % 3 == 0:
                c[k] = (k, t, b"x" * (50 + i % 200))
            else:
                v = c.get(k)
                assert v is not None and v[0] == k and set(v[2]) == {ord("x")}, v

    run_threads(work, 6)


def test_threads_mixed_operations(cache, rand):
    c = cache(num_pages=5, page_size=8192, lock_timeout=20)
    seeds = [rand.randrange(2**32) for _ in range(6)]

    def work(t):
        import random

        r = random.Random(seeds[t])
        mine = [f"t{t}-{i}" for i in range(30)]
        model = {}
        for _ in range(600):
            k = r.choice(mine)
            op = r.random()
            if op < 0.5:
                v = r.randbytes(r.randint(0, 100))
                if c.set(k, v):
                    model[k] = v
            elif op < 0.8:
                got = c.get(k)
                assert got is None or got == model.get(k)
            elif op < 0.9:
                c.remove(k)
                model.pop(k, None)
            else:
                list(c.keys())
                len(c)

    run_threads(work, 6)


# ---------------------------------------------------------------- re-entrancy


@pytest.mark.parametrize(
    "inner",
    [
        lambda c: c.get("k"),
        lambda c: c.set("k", 1),
        lambda c: c["k"],
        lambda c: "k" in c,
        lambda c: c.exists("k"),
        lambda c: c.remove("k"),
        lambda c: c.get_and_set("k", incr),
        lambda c: c.get("another-key"),  # one page: the same page lock
    ],
    ids=["get", "set", "getitem", "contains", "exists", "remove", "get_and_set", "other-key"],
)
def test_get_and_set_fn_calling_the_cache_raises_error(cache, inner):
    c = cache(num_pages=1, page_size=8192, lock_timeout=2)
    c["k"] = 10
    c["another-key"] = 20

    def fn(key, old):
        inner(c)
        return old + 1  # pragma: no cover - inner must raise

    with pytest.raises(fastmmap.Error):
        c.get_and_set("k", fn)
    # The page was released: everything works again, and nothing changed.
    assert c["k"] == 10
    assert c.get_and_set("k", incr) == 11
    c["another-key"] = 21
    assert dict(c) == {"k": 11, "another-key": 21}


def test_get_and_set_fn_may_catch_the_reentrancy_error(cache):
    c = cache(num_pages=1, page_size=8192, lock_timeout=2)
    c["k"] = 1
    caught = []

    def fn(key, old):
        try:
            c.get("k")
        except fastmmap.Error as e:
            caught.append(e)
        return old + 1

    assert c.get_and_set("k", fn) == 2
    assert len(caught) == 1
    assert c["k"] == 2


class Boom(Exception):
    pass


def test_exception_in_get_and_set_fn_propagates_and_unlocks(cache, forked):
    c = cache(num_pages=1, page_size=8192, lock_timeout=2)
    c["k"] = "old"

    def fn(key, old):
        raise Boom(old)

    with pytest.raises(Boom) as info:
        c.get_and_set("k", fn)
    assert info.value.args == ("old",)
    assert c["k"] == "old"
    # Same thread, other thread, other process: the page is free.
    c["k"] = "same-thread"
    run_threads(lambda i: c.set("k", "other-thread"), 1)
    assert c["k"] == "other-thread"
    assert forked(lambda: c.set("k", "child")) is True
    assert c["k"] == "child"


def test_fn_returning_an_unstorable_value_unlocks(cache):
    c = cache(num_pages=1, page_size=8192, lock_timeout=2)
    c["k"] = "old"
    with pytest.raises(TypeError):
        c.get_and_set("k", lambda k, v: threading.Lock())  # not picklable
    assert c["k"] == "old"
    c["k"] = "new"
    assert c["k"] == "new"


# ---------------------------------------------------------------- lock timeouts


def test_lock_timeout_between_threads(cache):
    c = cache(num_pages=1, page_size=8192, lock_timeout=1)
    c["k"] = 0
    inside, release = threading.Event(), threading.Event()

    def holder(i):
        def fn(key, old):
            inside.set()
            assert release.wait(THREAD_TIMEOUT)
            return old + 1

        c.get_and_set("k", fn)

    t = threading.Thread(target=holder, args=(0,), daemon=True)
    t.start()
    try:
        assert inside.wait(THREAD_TIMEOUT)
        start = time.monotonic()
        with pytest.raises(fastmmap.LockTimeout) as info:
            c.get("k")
        elapsed = time.monotonic() - start
        assert isinstance(info.value, TimeoutError)
        assert 0.5 <= elapsed < 10, elapsed
    finally:
        release.set()
        t.join(THREAD_TIMEOUT)
    assert not t.is_alive(), "possible deadlock"
    assert c["k"] == 1


def test_lock_timeout_between_processes(cache, forked):
    c = cache(num_pages=1, page_size=8192, lock_timeout=1)
    c["k"] = 0
    to_parent_r, to_parent_w = os.pipe()
    to_child_r, to_child_w = os.pipe()

    def child():
        def fn(key, old):
            os.write(to_parent_w, b"in")
            os.read(to_child_r, 1)  # wait for the parent
            return old + 1

        return c.get_and_set("k", fn)

    proc = forked.start(child)
    try:
        ready, _, _ = select.select([to_parent_r], [], [], 30)
        assert ready, "child never took the lock"
        os.read(to_parent_r, 2)
        start = time.monotonic()
        with pytest.raises(fastmmap.LockTimeout):
            c.set("k", 100)
        assert 0.5 <= time.monotonic() - start < 10
    finally:
        os.write(to_child_w, b"go")
    assert proc.result() == 1
    assert c["k"] == 1
    for fd in (to_parent_r, to_parent_w, to_child_r, to_child_w):
        os.close(fd)


def test_a_killed_lock_holder_does_not_deadlock(cache, forked):
    """A process SIGKILLed while it holds a page lock: the next locker gets
    the page (robust mutex), repaired if needed, and never hangs."""
    path = cache.path()
    c = cache(path, num_pages=1, page_size=8192, lock_timeout=5)
    for i in range(20):
        c[f"k{i}"] = i
    r, w = os.pipe()

    def child():
        def fn(key, old):
            os.write(w, b"x")
            time.sleep(60)

        c.get_and_set("k0", fn)

    proc = forked.start(child)
    try:
        ready, _, _ = select.select([r], [], [], 30)
        assert ready, "child never took the lock"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        os.close(r)
        os.close(w)
    # The page is usable again, from this handle and from a fresh one.
    got = c.get("k1")
    assert got in (1, None)
    if got is None:  # the page was re-initialised
        assert c.repaired_pages() >= 1
    assert c.set("after", "ok") is True
    other = cache(path, lock_timeout=5)
    assert other["after"] == "ok"
    assert c.get_and_set("n", incr) == 1


# ---------------------------------------------------------------- processes


@pytest.mark.multiprocess
def test_processes_times_threads_increments_are_exact(cache, forked):
    c = cache(num_pages=5, page_size=8192, lock_timeout=20)
    keys = ["a", "b", "c", "d"]
    n_threads, n_incr = 4, 300

    def child():
        def work(i):
            for j in range(n_incr):
                c.get_and_set(keys[(i + j) % len(keys)], incr)

        run_threads(work, n_threads)
        return True

    procs = [forked.start(child) for _ in range(2)]
    for j in range(n_incr):  # the parent joins in
        c.get_and_set(keys[j % len(keys)], incr)
    for p in procs:
        assert p.result(60) is True
    assert sum(c[k] for k in keys) == (2 * n_threads + 1) * n_incr
