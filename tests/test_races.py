"""Races between processes and threads: creating one file, atomic updates.

Processes are started together through a barrier (every child reports ready
on a pipe, then all wait on a second pipe that the parent opens at once), so
that they really hit the same code at the same instant.  Every child and
thread has a time limit: a hang fails the test as a possible deadlock.
"""

from __future__ import annotations

import os
import select
import threading
import time

import pytest

import fastmmap
from _helpers import run_threads as _run_threads

N_PROCS = 32
ROUNDS = 5
THREAD_TIMEOUT = 60.0
CHILD_TIMEOUT = 90.0

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(600)]


class Barrier:
    """Start n forked children at the same instant.

    A child calls ``wait()``: it reports ready, then blocks until the parent's
    ``release()``, which first waits for all n to be ready.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.ready_r, self.ready_w = os.pipe()
        self.go_r, self.go_w = os.pipe()

    def wait(self) -> None:  # in a child
        os.write(self.ready_w, b"r")
        if os.read(self.go_r, 1) != b"g":
            raise RuntimeError("barrier broken")

    def release(self, timeout: float = 60.0) -> None:  # in the parent
        got = 0
        deadline = time.monotonic() + timeout
        while got < self.n:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.ready_r], [], [], max(0.0, left))
            if not ready:
                raise AssertionError(f"only {got} of {self.n} children reached the barrier in {timeout}s")
            got += len(os.read(self.ready_r, self.n - got))
        os.write(self.go_w, b"g" * self.n)

    def close(self) -> None:
        for fd in (self.ready_r, self.ready_w, self.go_r, self.go_w):
            os.close(fd)


def run_together(forked, fn, n: int, *, timeout: float = CHILD_TIMEOUT) -> list:
    """Run fn(i) in n forked children released at once; return their results in order."""
    barrier = Barrier(n)
    try:

        def child(i):
            barrier.wait()
            return fn(i)

        procs = [forked.start(child, i) for i in range(n)]
        barrier.release()
        return [p.result(timeout) for p in procs]
    finally:
        barrier.close()


def run_threads(target, n, *, timeout=THREAD_TIMEOUT):
    _run_threads(target, n, timeout=timeout)


def incr(key, old):
    return (old or 0) + 1


# ---------------------------------------------------------------- creating one file


CREATE_OPTIONS = {
    "default-geometry": {},
    "explicit-sizes": {"init_file": False, "page_size": 8192, "num_pages": 13},
    "cache-size": {"init_file": False, "cache_size": "256k", "page_size": "16k"},
}


@pytest.mark.parametrize("options", list(CREATE_OPTIONS.values()), ids=list(CREATE_OPTIONS))
def test_processes_creating_the_same_new_file_at_the_same_instant(forked, tmp_path, options):
    """32 processes open one new path at once: all succeed, exactly one creates
    the file, all see the same file and geometry, no temporary file is left."""
    for round_ in range(ROUNDS):
        d = tmp_path / f"round{round_}"
        d.mkdir()
        path = str(d / "cache.fmm")

        def child(i):
            c = fastmmap.Cache(path, unlink_on_exit=False, **options)
            st = os.stat(path)
            c.set(f"from-{i}", i)
            c.get_and_set("count", incr)
            return dict(
                geometry=(c.page_size, c.num_pages),
                created=c._created,
                file=(st.st_dev, st.st_ino),
                problems=c.check(),
            )

        results = run_together(forked, child, N_PROCS)
        assert sorted(os.listdir(d)) == ["cache.fmm"], f"round {round_}: temporary files left behind"
        assert [r["problems"] for r in results] == [[]] * N_PROCS
        assert len({r["file"] for r in results}) == 1, f"round {round_}: processes ended up on different files"
        assert len({r["geometry"] for r in results}) == 1, results
        assert sum(r["created"] for r in results) == 1, f"round {round_}: {sum(r['created'] for r in results)} creators"
        page_size, num_pages = results[0]["geometry"]
        assert os.path.getsize(path) == 4096 + page_size * num_pages
        if "page_size" in options and "num_pages" in options:
            assert (page_size, num_pages) == (options["page_size"], options["num_pages"])
        with fastmmap.Cache(path) as c:
            assert (c.page_size, c.num_pages) == (page_size, num_pages)
            assert c.check() == []
            assert c["count"] == N_PROCS
            assert {k: c[k] for k in c.keys() if k.startswith("from-")} == {f"from-{i}": i for i in range(N_PROCS)}
        os.unlink(path)


def test_processes_reinitialising_the_same_file_at_the_same_instant(forked, tmp_path):
    """32 processes with init_file=True and new sizes: no error, one valid file
    with the new geometry at the end, no temporary file left."""
    for round_ in range(ROUNDS):
        d = tmp_path / f"round{round_}"
        d.mkdir()
        path = str(d / "cache.fmm")
        with fastmmap.Cache(path, page_size=4096, num_pages=3, unlink_on_exit=False) as old:
            old["old"] = 1

        def child(i):
            c = fastmmap.Cache(path, init_file=True, page_size=8192, num_pages=5, unlink_on_exit=False)
            c.set(f"from-{i}", i)  # may be wiped by a later init_file: only must not fail
            return (c.page_size, c.num_pages)

        assert run_together(forked, child, N_PROCS) == [(8192, 5)] * N_PROCS
        assert sorted(os.listdir(d)) == ["cache.fmm"], f"round {round_}: temporary files left behind"
        with fastmmap.Cache(path) as c:
            assert (c.page_size, c.num_pages) == (8192, 5)
            assert c.check() == []
            assert "old" not in c
        os.unlink(path)


# ---------------------------------------------------------------- atomic operations across processes


def test_add_of_one_key_by_many_processes_stores_once(forked, cache):
    path = cache.path()
    c = cache(path, num_pages=3, page_size=8192)
    for round_ in range(ROUNDS):
        key = f"winner-{round_}"

        def child(i):
            return fastmmap.Cache(path).add(key, i)

        won = run_together(forked, child, N_PROCS)
        assert sum(won) == 1, won
        assert c[key] == won.index(True)


def test_get_and_remove_of_one_key_by_many_processes_returns_it_once(forked, cache):
    path = cache.path()
    c = cache(path, num_pages=3, page_size=8192)
    for round_ in range(ROUNDS):
        key = f"token-{round_}"
        c[key] = ("token", round_)

        def child(i):
            return fastmmap.Cache(path).get_and_remove(key)

        got = run_together(forked, child, N_PROCS)
        assert [g for g in got if g is not None] == [("token", round_)], got
        assert key not in c


# ---------------------------------------------------------------- threads in processes

KEYS = ["alpha", "beta", b"gamma", "delta"]
N_THREADS = 8
N_INCR = 400  # per thread, half get_and_set and half lock-block increments


def _expected_counts(n_procs: int) -> dict:
    counts = dict.fromkeys(KEYS, 0)
    for t in range(N_THREADS):
        for j in range(N_INCR):
            counts[KEYS[(t + j) % len(KEYS)]] += n_procs
    return counts


def _increment_from_threads(get_handle):
    def work(t):
        c = get_handle()
        for j in range(N_INCR):
            key = KEYS[(t + j) % len(KEYS)]
            if j % 2:
                c.get_and_set(key, incr)
            else:
                with c.lock(key) as e:
                    e.value = (e.value or 0) + 1

    run_threads(work, N_THREADS)
    return True


@pytest.mark.parametrize("handles", ["shared", "per-thread"])
def test_threads_in_two_processes_increment_exactly(forked, cache, handles):
    """8 threads in each of 2 processes increment a few keys with get_and_set
    and with lock blocks; no increment is lost or doubled."""
    path = cache.path()
    c = cache(path, num_pages=3, page_size=8192)  # no lock_timeout: a lost lock would hang
    for k in KEYS:
        c[k] = 0

    def child(i):
        if handles == "shared":
            # process 0 shares the inherited handle, process 1 one fresh handle
            h = c if i == 0 else fastmmap.Cache(path)
            return _increment_from_threads(lambda: h)
        return _increment_from_threads(lambda: fastmmap.Cache(path))

    assert run_together(forked, child, 2, timeout=2 * THREAD_TIMEOUT) == [True, True]
    assert {k: c[k] for k in KEYS} == _expected_counts(2)
    assert c.check() == []


def test_threads_of_two_processes_and_the_parent_increment_one_key_exactly(forked, cache):
    """All increments on a single key (a single page): maximal contention."""
    path = cache.path()
    c = cache(path, num_pages=5, page_size=8192)

    def work(t):
        for j in range(300):
            if (t + j) % 2:
                c.get_and_set("hot", incr)
            else:
                with c.lock("hot") as e:
                    e.value = (e.value or 0) + 1

    barrier = Barrier(2)
    try:

        def child(i):
            barrier.wait()
            run_threads(work, N_THREADS)
            return True

        procs = [forked.start(child, i) for i in range(2)]
        barrier.release()
        run_threads(work, 4)  # the parent joins in
        assert [p.result(2 * THREAD_TIMEOUT) for p in procs] == [True, True]
    finally:
        barrier.close()
    assert c["hot"] == (2 * N_THREADS + 4) * 300
