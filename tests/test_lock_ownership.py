"""Who owns a page lock, and that every lock taken is released.

- Signals: a signal handler that raises while a ``with cache.lock(k)``,
  ``cache.page(pk)`` or ``with share:`` waits for (or has just taken) its
  page must leave the page unlocked: the lock is taken and recorded in one
  C call (fastmmap._fastmmap.PageLock).  A storm of SIGALRMs at random
  moments against contended waiters, then every page must be lockable by
  another process at once while all of them are still alive (a process
  that exits would release a leaked robust mutex and hide the leak).
- A PageLock that dies holding its page releases it, in its thread or, from
  another thread, at the holder's next lock; close() releases the pages
  this thread holds.
- Fork under the lock: a child forked inside get_and_set's function or
  inside read_cb holds nothing, so its store is refused (fastmmap.Error)
  and writes no byte of the page its parent still holds.
"""

from __future__ import annotations

import os
import random
import select
import signal
import struct
import threading
import time

import pytest

import fastmmap

FILE_HEADER = 4096
FUTEX_WAITERS = 0x80000000


class Alarm(Exception):
    """What the tests' signal handlers raise (a request timeout, say)."""


def _keys_per_page(c: fastmmap.Cache, prefix: str = "k") -> list[str]:
    """One key for each page of c."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < c.num_pages:
        k = f"{prefix}{n}"
        with c.lock(k) as e:
            page = e._page
        assert page is not None
        found.setdefault(page, k)
        n += 1
    return [found[p] for p in sorted(found)]


def _read_exactly(fd: int, n: int, timeout: float = 60.0) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(left, 0))
        if not ready:
            raise AssertionError(f"no word from the other process in {timeout}s: possible deadlock")
        chunk = os.read(fd, n - len(out))
        if not chunk:
            raise AssertionError("the other process went away")
        out += chunk
    return out


def _all_pages_free(path: str, keys: list[str], share: fastmmap.Share | None, options=None) -> str:
    """Lock each page through a handle of our own (timing out after 5 s), then the Share."""
    with fastmmap.Cache(path, lock_timeout=5, **(options or {})) as checker:
        for k in keys:
            with checker.lock(k):
                pass
    if share is not None:
        with share:
            pass
    return "free"


# ---------------------------------------------------------------- one signal, deterministic


@pytest.mark.multiprocess
def test_a_signal_during_the_wait_leaves_the_page_free(cache, forked):
    """The main thread waits for a page another process holds; a SIGUSR1
    arrives during the wait and the holder releases just after it.  Whether
    the handler's exception comes out of the wait or just after the lock
    was taken, the page must end up free: this thread can lock it again and
    so can the other process, both at once."""
    c = cache(num_pages=1, page_size=4096, lock_timeout=10)
    path = c.share_file
    to_holder_r, to_holder_w = os.pipe()
    from_holder_r, from_holder_w = os.pipe()

    def holder():
        with c.lock("k"):
            os.write(from_holder_w, b"h")
            _read_exactly(to_holder_r, 1)  # "release"
        _read_exactly(to_holder_r, 1)  # "lock again"
        with fastmmap.Cache(path, lock_timeout=5) as again:
            with again.lock("k") as e:
                seen = e.value
        return seen

    proc = forked.start(holder)
    _read_exactly(from_holder_r, 1)
    fd = os.open(path, os.O_RDONLY)
    main = threading.get_ident()
    errors: list[BaseException] = []

    def signaller():
        try:
            # the waiter has set FUTEX_WAITERS in the lock word: it is in the wait
            deadline = time.monotonic() + 30
            while not struct.unpack("I", os.pread(fd, 4, FILE_HEADER))[0] & FUTEX_WAITERS:
                if time.monotonic() > deadline:
                    raise AssertionError("the main thread never waited for the page")
                time.sleep(0.001)
            signal.pthread_kill(main, signal.SIGUSR1)
            os.write(to_holder_w, b"r")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def on_usr1(signum, frame):
        raise Alarm

    old = signal.signal(signal.SIGUSR1, on_usr1)
    t = threading.Thread(target=signaller)
    try:
        t.start()
        with pytest.raises(Alarm):
            with c.lock("k") as e:
                e.value = "main"  # (if the handler ran here, the with block released the page)
    finally:
        signal.signal(signal.SIGUSR1, old)
        t.join(30)
        os.close(fd)
    assert not errors, errors
    with c.lock("k") as e:  # no RecursiveLockError: nothing left held
        e.value = "after"
    os.write(to_holder_w, b"a")
    assert proc.result() == "after"  # and the other process got the page
    assert c.repaired_pages() == 0


# ---------------------------------------------------------------- the storm

STORM_SECONDS = float(os.environ.get("FASTMMAP_SIGNAL_STORM_SECONDS", "30"))


def _storm_holder(c, share, keys, seed, deadline):
    """Hold random pages (and the Share) for random short times."""
    rand = random.Random(seed)
    n = 0
    while time.monotonic() < deadline:
        if rand.random() < 0.2:
            with share:
                time.sleep(rand.uniform(0, 0.003))
        else:
            with c.lock(rand.choice(keys)):
                time.sleep(rand.uniform(0, 0.003))
        n += 1
    return n


def _storm_waiter(c, share, keys, seed, deadline, ready_w, quit_r):
    """Lock blocks of every kind while SIGALRMs arrive at random moments and
    their handler raises; then check that this thread can still lock every
    page, report on ready_w, and stay alive until quit_r says so."""
    rand = random.Random(seed)
    timer = random.Random(seed + 1)
    armed = [False]
    ops = interrupted = 0
    failures: list[str] = []

    def on_alarm(signum, frame):
        signal.setitimer(signal.ITIMER_REAL, timer.uniform(0.0001, 0.004))
        if armed[0]:
            armed[0] = False  # one exception per armed operation
            raise Alarm

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 0.001)
    while time.monotonic() < deadline and not failures:
        op = rand.randrange(3)
        key = rand.choice(keys)
        try:
            try:
                armed[0] = True
                if op == 0:
                    with c.lock(key) as e:
                        e.value = (e.value or 0) + 1
                elif op == 1:
                    with c.page(key) as p:
                        p["n"] = p.get("n", 0) + 1
                else:
                    with share:
                        share.set((share.get() or 0) + 1)
                armed[0] = False
                ops += 1
            except fastmmap.Error as e:  # RecursiveLockError, LockTimeout: a leaked lock
                armed[0] = False
                failures.append(f"op {op} on {key!r}: {e!r}")
        except Alarm:
            interrupted += 1
    signal.setitimer(signal.ITIMER_REAL, 0)
    armed[0] = False
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    try:
        for k in keys:
            with c.lock(k):
                pass
        with share:
            pass
    except fastmmap.Error as e:
        failures.append(f"after the storm: {e!r}")
    os.write(ready_w, b"r")
    _read_exactly(quit_r, 1, timeout=300)
    return ops, interrupted, failures


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(STORM_SECONDS + 240)
def test_signal_storm_leaves_every_page_free(cache, forked, rand):
    """Two waiters run lock blocks (cache.lock, cache.page, a Share) against
    a holder that keeps the pages busy, while SIGALRMs raise in the waiters
    at random moments for STORM_SECONDS.  Then, with every process still
    alive, each page and the Share can be locked by another process at once
    (lock_timeout), the waiters can still lock every page, and no page was
    repaired."""
    c = cache(num_pages=4, page_size=4096, lock_timeout=20)
    share = fastmmap.Share(64)
    try:
        keys = _keys_per_page(c)
        deadline = time.monotonic() + STORM_SECONDS
        ready_r, ready_w = os.pipe()
        quit_r, quit_w = os.pipe()
        holder = forked.start(_storm_holder, c, share, keys, rand.randrange(2**32), deadline)
        waiters = [
            forked.start(_storm_waiter, c, share, keys, rand.randrange(2**32), deadline, ready_w, quit_r)
            for _ in range(2)
        ]
        try:
            _read_exactly(ready_r, len(waiters), timeout=STORM_SECONDS + 120)
            assert holder.result(timeout=60) > 0
            # every waiter is alive and idle: nothing may hold any page now
            assert forked(_all_pages_free, c.share_file, keys, share, timeout=60) == "free"
        finally:
            os.write(quit_w, b"q" * len(waiters))
        results = [w.result(timeout=60) for w in waiters]
    finally:
        share.close()
    failures = [f for _, _, fs in results for f in fs]
    assert not failures, failures
    ops = sum(r[0] for r in results)
    interrupted = sum(r[1] for r in results)
    print(f"{ops} lock blocks completed, {interrupted} interrupted by a signal")
    assert ops > 0 and interrupted > 0, (ops, interrupted)
    assert c.repaired_pages() == 0
    assert c.check() == []


# ---------------------------------------------------------------- dead holders and close()


@pytest.mark.multiprocess
def test_a_lock_block_object_that_dies_holding_releases(cache, forked):
    """A LockedEntry entered but never exited (its with statement never got
    to run __exit__) releases the page when it is garbage."""
    c = cache(num_pages=1, page_size=4096)
    block = c.lock("k")
    block.__enter__()
    block.value = "kept"
    del block
    with c.lock("k") as e:  # no RecursiveLockError
        assert e.value == "kept"
    path = c.share_file
    assert forked(_all_pages_free, path, ["k"], None) == "free"


@pytest.mark.multiprocess
def test_a_lock_block_object_dying_in_another_thread(cache, forked):
    """Only the holding thread can unlock a page: a LockedEntry collected in
    another thread leaves its page to the holder, which releases it at its
    next lock of the cache (instead of RecursiveLockError)."""
    c = cache(num_pages=2, page_size=4096)
    k0, k1 = _keys_per_page(c)
    box: list[object] = []
    entered = threading.Event()
    dropped = threading.Event()
    result: list[object] = []

    def holder():
        block = c.lock(k0)
        block.__enter__()
        box.append(block)
        del block
        entered.set()
        dropped.wait(30)
        try:
            with c.lock(k1) as e:
                e.value = "ok"
            result.append("ok")
        except BaseException as e:  # noqa: BLE001 - checked below
            result.append(e)

    t = threading.Thread(target=holder)
    t.start()
    assert entered.wait(30)
    box.clear()  # the last reference goes here, in the main thread
    dropped.set()
    t.join(30)
    assert result == ["ok"]
    assert forked(_all_pages_free, c.share_file, [k0, k1], None) == "free"


@pytest.mark.multiprocess
@pytest.mark.parametrize("fmt", ["native", "perl"])
def test_close_releases_a_held_lock(cache, forked, fmt):
    """close() inside a lock block releases the page at once; the block's
    operations then raise ValueError, and leaving it does nothing."""
    if fmt == "perl":  # (the reopening process gives Perl's geometry again)
        opts = {"format": "perl", "serializer": "raw", "cache_size": "64k", "num_pages": 1}
    else:
        opts = {}
    c = cache(unlink_on_exit=False, **(opts or {"num_pages": 1, "page_size": 4096}))
    path = c.share_file
    c["k"] = "v"
    with c.lock("k") as e:
        c.close()
        assert forked(_all_pages_free, path, ["k"], None, opts) == "free"
        with pytest.raises(ValueError, match="closed"):
            e.value = "late"
    assert c.closed


def test_share_lock_is_reentrant_and_checked():
    s = fastmmap.Share(100)
    try:
        with pytest.raises(fastmmap.Error, match="unlock without lock"):
            s.unlock()
        with s:
            with s:
                s.set("x")
            assert s._held()
        assert not s._held()
        assert s.get() == "x"
    finally:
        s.close()


# ---------------------------------------------------------------- fork under the lock


def _fork_in_callback(call):
    """call(cb) makes a cache call whose callback is cb(); cb forks.  In the
    child cb returns "from-the-child" and the child reports how the call
    ended (always leaving with os._exit); the parent's cb waits until the
    child has exited (so the child's store comes while the parent holds the
    page) and returns "from-the-parent".  Returns (the parent's outcome,
    the child's report)."""
    r, w = os.pipe()
    state: dict[str, object] = {"child": False}

    def cb(child_value="from-the-child"):
        pid = os.fork()
        if pid == 0:
            state["child"] = True
            return child_value
        os.close(w)
        report = b""
        while chunk := os.read(r, 4096):
            report += chunk
        os.close(r)
        _, status = os.waitpid(pid, 0)
        state["report"] = report.decode()
        state["status"] = status
        return "from-the-parent"

    try:
        try:
            out = f"returned {call(cb)!r}"
        except Exception as e:
            out = f"{type(e).__name__}: {e}"
        if state["child"]:
            os.write(w, out.encode())
    finally:
        if state["child"]:
            os._exit(0)
    assert os.WIFEXITED(state["status"]) and os.WEXITSTATUS(state["status"]) == 0
    return out, state["report"]


def _make(cache, fmt, **kw):
    if fmt == "perl":
        return cache(format="perl", serializer="raw", cache_size="64k", num_pages=1, **kw)
    return cache(num_pages=1, page_size=8192, **kw)


def _file_bytes(c) -> bytes:
    with open(c.share_file, "rb") as f:
        return f.read()


def _assert_child_refused(c, out, report):
    assert out == "returned 'from-the-parent'", out
    # fastmmap.Error itself: the store (and the unlock) refused in the child
    assert report.startswith("Error: ") and "not locked by this thread" in report, report
    assert b"from-the-child" not in _file_bytes(c)
    assert c.repaired_pages() == 0
    assert c.check() == []


@pytest.mark.multiprocess
@pytest.mark.parametrize("fmt", ["native", "perl"])
def test_a_child_forked_in_get_and_set_writes_nothing(cache, fmt):
    c = _make(cache, fmt)
    c["k"] = "v0"
    out, report = _fork_in_callback(lambda cb: c.get_and_set("k", lambda key, old: cb()))
    _assert_child_refused(c, out, report)
    assert c["k"] == "from-the-parent"


@pytest.mark.multiprocess
@pytest.mark.parametrize("fmt", ["native", "perl"])
@pytest.mark.parametrize("child_value", ["from-the-child", None])
def test_a_child_forked_in_read_cb_writes_nothing(cache, fmt, child_value):
    """Whether the child's read_cb result is to be stored or not (None, a
    miss), the child's get raises: the page was never its to use."""
    calls: list = []

    def read_cb(ctx, key):
        return calls[-1](child_value)

    c = _make(cache, fmt, read_cb=read_cb)

    def get_through(cb):
        calls.append(cb)
        return c.get("k")

    out, report = _fork_in_callback(get_through)
    _assert_child_refused(c, out, report)
    assert c.get("k") == "from-the-parent"


def test_close_with_empty_on_exit_inside_a_lock_block(cache):
    """empty_on_exit empties every page at close(): the page this thread
    holds is released first, so the close does not fail half-way."""
    c = cache(num_pages=2, page_size=4096, unlink_on_exit=False, empty_on_exit=True)
    keys = _keys_per_page(c)
    for k in keys:
        c[k] = "v"
    path = c.share_file
    with c.lock(keys[1]):
        c.close()
    with fastmmap.Cache(path, lock_timeout=5) as again:
        assert len(again) == 0


@pytest.mark.multiprocess
def test_close_in_a_child_forked_inside_a_block(cache):
    """A child forked inside a block that closes the cache and then leaves
    the block gets no error, and releases nothing: the parent still holds
    the page until it leaves the block."""
    c = cache(num_pages=1, page_size=4096, lock_timeout=0.2)
    r, w = os.pipe()
    with c.lock("k") as e:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(r)
                try:
                    c.close()
                    e.__exit__(None, None, None)
                    out = "ok"
                except Exception as exc:
                    out = repr(exc)
                os.write(w, out.encode())
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        report = _read_exactly(r, 2)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert report == b"ok"
        e.value = "parent"  # still held here
    assert c["k"] == "parent"
