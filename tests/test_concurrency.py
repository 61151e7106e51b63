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
from _helpers import run_threads as _run_threads
from _helpers import wait_for_a_sleeper

THREAD_TIMEOUT = 30.0

pytestmark = pytest.mark.timeout(120)


def run_threads(target, n, *, timeout=THREAD_TIMEOUT):
    _run_threads(target, n, timeout=timeout)


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
        assert "%" not in str(info.value), f"unformatted message: {info.value}"
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


def _framed(key: str, i: int, size: int) -> bytes:
    """A self-checking value: a torn or mixed-up copy is detectable."""
    head = f"{key}|{i}|{size}|".encode()
    return head + b"x" * size + b"|end"


def _check_framed(key: str, value) -> None:
    assert isinstance(value, bytes), value
    k, i, size, rest = value.split(b"|", 3)
    assert k.decode() == key
    assert rest == b"x" * int(size) + b"|end"


@pytest.mark.multiprocess
def test_writer_killed_at_random_points_never_leaves_a_torn_value(cache, forked, rand):
    """SIGKILL a writer at random moments (often inside a store or a
    compaction).  Afterwards nothing hangs, every value read is either
    absent or intact, and the cache keeps working."""
    path = cache.path()
    c = cache(path, num_pages=2, page_size=16384, lock_timeout=5)
    keys = [f"k{i}" for i in range(40)]

    def writer():
        i = 0
        while True:
            k = keys[i % len(keys)]
            c.set(k, _framed(k, i, (i * 37) % 3000))
            i += 1

    for round_ in range(20):
        proc = forked.start(writer)
        time.sleep(rand.uniform(0.001, 0.01))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        for k in keys:
            v = c.get(k)
            if v is not None:
                _check_framed(k, v)
        assert c.set(f"after{round_}", b"ok") is True
        assert c.get(f"after{round_}") == b"ok"
    assert isinstance(c.repaired_pages(), int) and c.repaired_pages() >= 0
    fresh = cache(path, lock_timeout=5)
    for d in fresh.get_keys(2):
        if d["key"] in keys:
            _check_framed(d["key"], d["value"])


@pytest.mark.multiprocess
def test_anonymous_cache_is_shared_with_a_forked_child(forked):
    c = fastmmap.Cache(anonymous=True, num_pages=3)
    try:
        assert c.share_file is None
        c["k"] = "parent"

        def child():
            seen = c["k"]
            c["k"] = "child"
            return seen

        assert forked(child) == "parent"
        assert c["k"] == "child"
    finally:
        c.close()


def test_a_signal_interrupts_a_blocked_lock_wait(cache):
    """Ctrl-C (here: a handler that raises) ends a wait for a page lock."""

    class Interrupted(Exception):
        pass

    def handler(signum, frame):
        raise Interrupted

    c = cache(num_pages=1, page_size=8192)  # no lock_timeout: wait forever
    c["k"] = 1
    inside, release = threading.Event(), threading.Event()

    def holder(i):
        def fn(key, old):
            inside.set()
            assert release.wait(THREAD_TIMEOUT)
            return old + 1

        c.get_and_set("k", fn)

    def sender():
        # signal only once the main thread sleeps on the lock
        if wait_for_a_sleeper(c.share_file, 0, 8192):
            os.kill(os.getpid(), signal.SIGUSR1)

    t = threading.Thread(target=holder, args=(0,), daemon=True)
    s = threading.Thread(target=sender, daemon=True)
    old_handler = signal.signal(signal.SIGUSR1, handler)
    t.start()
    try:
        assert inside.wait(THREAD_TIMEOUT)
        s.start()
        # Were the wait not interrupted, the get would wait for the holder,
        # which waits for `release`: the test fails, it does not pass late.
        with pytest.raises(Interrupted):
            c.get("k")
    finally:
        s.join(THREAD_TIMEOUT)
        release.set()
        t.join(THREAD_TIMEOUT)
        signal.signal(signal.SIGUSR1, old_handler)
    assert not t.is_alive() and not s.is_alive(), "possible deadlock"
    assert c["k"] == 2


def test_close_while_another_thread_holds_a_page_lock(cache, forked):
    """close() racing a get_and_set in another thread must not crash: the
    other thread either finishes its store or gets ValueError."""
    c = cache(num_pages=1, page_size=8192)
    c["k"] = 1

    def child():
        inside, release = threading.Event(), threading.Event()
        outcome = []

        def holder(i):
            def fn(key, old):
                inside.set()
                release.wait(THREAD_TIMEOUT)
                return old + 1

            try:
                outcome.append(c.get_and_set("k", fn))
            except ValueError:
                outcome.append("closed")

        t = threading.Thread(target=holder, args=(0,))
        t.start()
        inside.wait(THREAD_TIMEOUT)
        closer = threading.Thread(target=c.close)
        closer.start()
        time.sleep(0.05)
        release.set()
        t.join(THREAD_TIMEOUT)
        closer.join(THREAD_TIMEOUT)
        assert not t.is_alive() and not closer.is_alive(), "possible deadlock"
        with pytest.raises(ValueError):
            c.get("k")
        return outcome

    assert forked(child) in ([2], ["closed"])
    assert c["k"] in (1, 2)


@pytest.mark.multiprocess
def test_many_processes_creating_the_same_file_at_once(cache, forked, tmp_path):
    """Creation is race-free: every process opens the one file, none fails."""
    path = cache.path()
    go_r, go_w = os.pipe()

    def child(n):
        os.read(go_r, 1)  # all start together
        with fastmmap.Cache(path, num_pages=5, page_size=8192, unlink_on_exit=False) as c:
            c.set(f"from-{n}", n)
            c.get_and_set("count", lambda k, v: (v or 0) + 1)
            return (c.page_size, c.num_pages)

    procs = [forked.start(child, n) for n in range(6)]
    os.write(go_w, b"x" * len(procs))
    results = [p.result() for p in procs]
    os.close(go_r)
    os.close(go_w)
    assert results == [(8192, 5)] * len(procs)
    c = cache(path)
    assert c["count"] == len(procs)
    assert sorted(k for k in c.keys() if k.startswith("from-")) == sorted(f"from-{n}" for n in range(6))
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)], "temporary files left behind"
