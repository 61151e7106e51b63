"""Damage to a live cache file: truncation and random byte writes while
other processes use it (README, "Caveats").

- Truncation: four forked workers hammer a small cache while the test
  truncates the file (to 0 bytes, or to the middle of a page).  Touching the
  lost part of a MAP_SHARED mapping raises SIGBUS; the engine's SIGBUS guard
  (csrc/fmm_guard.c) turns it into ``FileReplacedError`` on the handle.
  Every worker must end either still working or with a ``fastmmap.Error``,
  never killed by a signal, never with a wrong value.
- Byte damage: a supervisor writes random bytes at random offsets of the
  file (header, page headers with their lock words, slot tables, entries)
  every few milliseconds while the workers run.  Workers must never die of a
  signal and never hang; what they may see is a clear exception.  Values
  carry a checksum of key and payload: the engine has no per-entry checksum,
  so a byte written into a value's payload (or into an entry's length) is
  returned as it is; the workers count such values (they must all be caught
  by the checksum, i.e. be ``bytes``) and the test reports the count.

The tests wait for events, never for a length of time, so that a loaded
machine only makes them slower: each worker writes a byte to its own pipe
after every operation, and the test counts those bytes (each worker has
started and is working; each worker completed operations after a round of
damage) and sees a worker's exit as the end of its pipe.  The only clock is
HANG_SECONDS, far longer than any operation can take (a lock wait ends
after ``WORKER_LOCK_TIMEOUT``), so it fails a hang, never a slow machine.
``FASTMMAP_GUARD_SECONDS`` scales the amount of damage.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import select
import signal
import time
import traceback

import pytest

import fastmmap

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

SCALE = float(os.environ.get("FASTMMAP_GUARD_SECONDS", "1"))
PAGE_SIZE = 4096
NUM_PAGES = 4
FILE_SIZE = 4096 + PAGE_SIZE * NUM_PAGES
N_WORKERS = 4
KEYS = [f"key-{i}" for i in range(40)]
HANG_SECONDS = 60.0  # no operation may take this long: a hang
DAMAGE_ROUNDS = max(1, int(60 * SCALE))
WRITES_PER_ROUND = 25  # random writes, then every worker completes operations
WORKER_LOCK_TIMEOUT = 3.0  # a lock word damaged into a live TID: LockTimeout, not a hang

# exit codes of a worker
EXIT_STOPPED = 0  # still working when told to stop
EXIT_REPLACED = 10  # FileReplacedError
EXIT_FAILED = 1  # a wrong value or an unexpected exception (details in a file)

# shared counters (uint64): [stop flag] then per worker [ops, errors, bad values]
N_FIELDS = 3
F_OPS, F_ERRORS, F_BAD = range(N_FIELDS)


def _digest(key: str, payload: bytes) -> bytes:
    return hashlib.sha1(key.encode() + b"\0" + payload).digest()[:8]


def make_value(key: str, rng: random.Random) -> bytes:
    payload = rng.randbytes(rng.choice((0, 5, rng.randint(0, 300))))
    return payload + _digest(key, payload)


def good(key: str, value: object) -> bool:
    return isinstance(value, bytes) and len(value) >= 8 and _digest(key, value[:-8]) == value[-8:]


class Shared:
    # A memoryview cast to "Q" reads and writes each counter with one 8-byte
    # access.  struct.pack_into would not do: it zeroes the field before
    # writing the value, so another process can read 0 in between.
    def __init__(self) -> None:
        self.m = mmap.mmap(-1, 8 * (1 + N_WORKERS * N_FIELDS))
        self.q = memoryview(self.m).cast("Q")

    def get(self, i: int) -> int:
        return int(self.q[i])

    def put(self, i: int, v: int) -> None:
        self.q[i] = v

    def field(self, w: int, f: int) -> int:
        return 1 + w * N_FIELDS + f

    def bump(self, w: int, f: int) -> None:
        i = self.field(w, f)
        self.put(i, self.get(i) + 1)


def _tick(fd: int) -> None:
    """One byte to the test per operation; a full pipe drops it (the test
    only needs to see that operations complete, not how many)."""
    try:
        os.write(fd, b".")
    except BlockingIOError:
        pass


def _worker(path: str, w: int, seed: int, shared: Shared, faildir: str, damage: bool, tick: int) -> int:
    """Random operations until told to stop.  Returns the exit code."""
    rng = random.Random(seed)
    errors: dict[str, int] = {}
    try:
        cache = fastmmap.Cache(path, serializer="raw", lock_timeout=WORKER_LOCK_TIMEOUT)
    except fastmmap.Error:
        return EXIT_REPLACED if not damage else EXIT_STOPPED
    while not shared.get(0):
        key = rng.choice(KEYS)
        op = rng.random()
        try:
            if op < 0.35:
                got = cache.get(key)
                if got is not None and not good(key, got):
                    if not damage:
                        raise AssertionError(f"bad value for {key!r}: {got!r:.200}")
                    shared.bump(w, F_BAD)
            elif op < 0.65:
                cache.set(key, make_value(key, rng))
            elif op < 0.75:
                cache.remove(key)
            elif op < 0.85:

                def fn(k, old, rng=rng):
                    if old is not None and not good(k, old) and not damage:
                        raise AssertionError(f"bad old value for {k!r}: {old!r:.200}")
                    return make_value(k, rng)

                cache.get_and_set(key, fn)
            else:
                with cache.lock(key) as held:
                    old = held.value
                    if old is not None and not good(key, old):
                        if not damage:
                            raise AssertionError(f"bad value in lock block for {key!r}: {old!r:.200}")
                        shared.bump(w, F_BAD)
                    held.value = make_value(key, rng)
        except fastmmap.FileReplacedError:
            if not damage:
                return EXIT_REPLACED
            errors["FileReplacedError"] = errors.get("FileReplacedError", 0) + 1
            shared.bump(w, F_ERRORS)
        except AssertionError:
            raise
        except Exception as e:  # noqa: BLE001 - byte damage: any clear exception is fine
            if not damage and not isinstance(e, fastmmap.Error):
                raise
            name = f"{type(e).__name__}: {str(e)[:60]}"
            errors[name] = errors.get(name, 0) + 1
            shared.bump(w, F_ERRORS)
        shared.bump(w, F_OPS)
        _tick(tick)
    with open(os.path.join(faildir, f"errors-{w}"), "w") as f:
        f.write(repr(sorted(errors.items())))
    cache.close()
    return EXIT_STOPPED


class Ticks:
    """The read ends of the workers' pipes: operations counted, exits seen."""

    def __init__(self, fds: list[int]) -> None:
        self.fds = fds
        self.count = [0] * len(fds)
        self.ended = [False] * len(fds)

    def _read(self, w: int) -> None:
        data = os.read(self.fds[w], 65536)
        if data:
            self.count[w] += len(data)
        else:  # every write end is closed: the worker has exited
            self.ended[w] = True

    def drain(self) -> None:
        """Count what is already in the pipes, without waiting."""
        for w in range(len(self.fds)):
            if not self.ended[w] and select.select([self.fds[w]], [], [], 0)[0]:
                self._read(w)  # a pipe holds at most 64 KiB: one read empties it

    def wait(self, targets: dict[int, int | None], timeout: float) -> list[int]:
        """Wait until each worker w has count >= targets[w] (or exited when
        the target is None); return the workers that did not get there."""

        def pending() -> list[int]:
            return [
                w for w, t in targets.items()
                if not self.ended[w] and (t is None or self.count[w] < t)
            ]

        deadline = time.monotonic() + timeout
        while pending():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select([self.fds[w] for w in pending()], [], [], left)
            for w in pending():
                if self.fds[w] in ready:
                    self._read(w)
        return [w for w, t in targets.items() if (t is None and not self.ended[w]) or
                (t is not None and self.count[w] < t)]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def _start_workers(path, shared, faildir, damage, seed):
    pids, fds = [], []
    for w in range(N_WORKERS):
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = EXIT_FAILED
            try:
                for fd in fds + [rfd]:
                    os.close(fd)
                os.set_blocking(wfd, False)
                code = _worker(path, w, seed * 100 + w, shared, faildir, damage, wfd)
            except BaseException:  # noqa: BLE001 - reported through the file
                with open(os.path.join(faildir, f"fail-{w}"), "w") as f:
                    f.write(traceback.format_exc())
            finally:
                os._exit(code)
        os.close(wfd)
        pids.append(pid)
        fds.append(rfd)
    return pids, Ticks(fds)


def _reap(pids, shared, ticks):
    """Stop the workers and wait for each to exit: {worker: status}.  One
    still running HANG_SECONDS after the stop flag is SIGKILLed and
    reported as hung."""
    shared.put(0, 1)
    late = set(ticks.wait({w: None for w in range(len(pids))}, HANG_SECONDS))
    status = {}
    for w, pid in enumerate(pids):
        if w in late:
            os.kill(pid, signal.SIGKILL)
        _, st = os.waitpid(pid, 0)
        status[w] = "hung" if w in late else st
    ticks.close()
    return status


def _failures(faildir):
    out = []
    for name in sorted(os.listdir(faildir)):
        if name.startswith("fail-"):
            with open(os.path.join(faildir, name)) as f:
                out.append(f"{name}:\n{f.read()}")
    return out


def _describe(st):
    if st == "hung":
        return "hung (killed by the test)"
    if os.WIFSIGNALED(st):
        return f"killed by signal {signal.Signals(os.WTERMSIG(st)).name}"
    return f"exit {os.WEXITSTATUS(st)}"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("cut", ["zero", "mid-page"])
def test_truncate_while_workers_run(tmp_path, cut):
    path = str(tmp_path / "cache.fmm")
    faildir = str(tmp_path / "fail")
    os.mkdir(faildir)
    fastmmap.Cache(path, page_size=PAGE_SIZE, num_pages=NUM_PAGES, init_file=True, unlink_on_exit=False).close()
    shared = Shared()
    seed = random.randrange(1 << 30)
    t0 = time.monotonic()
    pids, ticks = _start_workers(path, shared, faildir, False, seed)
    try:
        # Truncate only once every worker has the file mapped and works on
        # it: one that opened the path after the truncation would get a new
        # file (an empty one is replaced) and rightly never see an error.
        slow = ticks.wait({w: 20 for w in range(N_WORKERS)}, HANG_SECONDS)
        assert not slow, f"seed {seed}: workers {slow} did not start working in {HANG_SECONDS}s"
        ops_before = sum(shared.get(shared.field(w, F_OPS)) for w in range(N_WORKERS))
        size = 0 if cut == "zero" else 4096 + 2 * PAGE_SIZE + PAGE_SIZE // 2
        os.truncate(path, size)
        # Every worker touches every page within a few operations and must
        # then stop by itself with FileReplacedError: wait for the exits.
        still = ticks.wait({w: None for w in range(N_WORKERS)}, HANG_SECONDS)
    finally:
        status = _reap(pids, shared, ticks)
    elapsed = time.monotonic() - t0
    fails = _failures(faildir)
    assert not fails, f"seed {seed}: " + "\n".join(fails)
    desc = {w: _describe(st) for w, st in status.items()}
    for w, st in status.items():
        assert st != "hung", f"seed {seed}: worker {w} hung: {desc}"
        assert os.WIFEXITED(st), f"seed {seed}: worker {w} {desc[w]}: {desc}"
        assert os.WEXITSTATUS(st) in (EXIT_STOPPED, EXIT_REPLACED), f"seed {seed}: {desc}"
    assert not still, (
        f"seed {seed}: workers {still} still working {HANG_SECONDS}s after the truncation "
        f"without FileReplacedError: {desc}"
    )
    replaced = sum(1 for st in status.values() if os.WEXITSTATUS(st) == EXIT_REPLACED)
    assert replaced == N_WORKERS, f"seed {seed}: {desc}"
    assert ops_before > 0
    print(f"truncate to {size} bytes: {ops_before} operations before, {replaced} workers "
          f"got FileReplacedError, none crashed ({elapsed:.1f}s)")

    # the file is reusable once recreated
    with fastmmap.Cache(path, page_size=PAGE_SIZE, num_pages=NUM_PAGES, init_file=True) as c:
        c.set("k", b"v")
        assert c.get("k") == b"v"
        assert c.check() == []


def _damage(fd, rng, n):
    """Write random bytes at n random offsets of the file."""
    for _ in range(n):
        r = rng.random()
        if r < 0.03:  # the file header
            off = rng.randrange(0, 128)
        elif r < 0.08:  # a page's lock (a glibc pthread_mutex_t: 40 bytes)
            off = 4096 + rng.randrange(NUM_PAGES) * PAGE_SIZE + rng.randrange(0, 40)
        elif r < 0.13:  # the rest of a page header: magic, dirty marker, counters
            off = 4096 + rng.randrange(NUM_PAGES) * PAGE_SIZE + rng.randrange(40, 128)
        elif r < 0.25:  # a slot table
            off = 4096 + rng.randrange(NUM_PAGES) * PAGE_SIZE + 128 + rng.randrange(0, 512)
        else:  # anywhere: entries, their headers and payloads
            off = rng.randrange(0, FILE_SIZE)
        os.pwrite(fd, rng.randbytes(rng.choice((1, 1, 2, 4))), off)


@pytest.mark.timeout(600)
def test_random_byte_damage_while_workers_run(tmp_path):
    path = str(tmp_path / "cache.fmm")
    faildir = str(tmp_path / "fail")
    os.mkdir(faildir)
    fastmmap.Cache(path, page_size=PAGE_SIZE, num_pages=NUM_PAGES, init_file=True, unlink_on_exit=False).close()
    shared = Shared()
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    writes = 0
    t0 = time.monotonic()
    pids, ticks = _start_workers(path, shared, faildir, True, seed)
    hung = []
    try:
        hung = ticks.wait({w: 5 for w in range(N_WORKERS)}, HANG_SECONDS)
        fd = os.open(path, os.O_RDWR)
        try:
            for _ in range(DAMAGE_ROUNDS):
                if hung:
                    break
                # A burst of writes while the workers run, then every worker
                # must complete one more operation: a worker that stops
                # making progress on a damaged file is a hang, however slow
                # the machine is.  (One, not more: a lock word damaged into
                # a live thread's id costs each operation on its page the
                # 3 s lock_timeout, and every round waits for all workers.)
                _damage(fd, rng, WRITES_PER_ROUND)
                writes += WRITES_PER_ROUND
                ticks.drain()
                hung = ticks.wait({w: ticks.count[w] + 1 for w in range(N_WORKERS)}, HANG_SECONDS)
        finally:
            os.close(fd)
    finally:
        status = _reap(pids, shared, ticks)
    elapsed = time.monotonic() - t0
    fails = _failures(faildir)
    assert not fails, f"seed {seed}: " + "\n".join(fails)
    desc = {w: _describe(st) for w, st in status.items()}
    for w, st in status.items():
        assert st != "hung", f"seed {seed}: worker {w} hung: {desc}"
        assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == EXIT_STOPPED, f"seed {seed}: worker {w}: {desc}"
    assert not hung, f"seed {seed}: workers {hung} completed no operation in {HANG_SECONDS}s: {desc}"
    ops = sum(shared.get(shared.field(w, F_OPS)) for w in range(N_WORKERS))
    errs = sum(shared.get(shared.field(w, F_ERRORS)) for w in range(N_WORKERS))
    bad = sum(shared.get(shared.field(w, F_BAD)) for w in range(N_WORKERS))
    kinds = []
    for w in range(N_WORKERS):
        p = os.path.join(faildir, f"errors-{w}")
        if os.path.exists(p):
            with open(p) as f:
                kinds.append(f.read())
    assert ops > 100, f"seed {seed}: only {ops} operations"
    print(f"{writes} random writes into the live file, {ops} operations, {errs} exceptions "
          f"{kinds}, {bad} damaged values caught by the checksum, no crash, no hang ({elapsed:.1f}s)")

    # a damaged file is recreated by init_file=True (or repaired in place)
    with fastmmap.Cache(path, page_size=PAGE_SIZE, num_pages=NUM_PAGES, init_file=True) as c:
        c.set("k", b"v")
        assert c.get("k") == b"v"
        assert c.check() == []
        for k in KEYS:
            c.set(k, make_value(k, rng))
        for k in KEYS:
            got = c.get(k)
            assert got is None or good(k, got)


def _join_all(threads, timeout):
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))


def _threads_then_truncate(path: str) -> dict:
    """Four threads of one process share a Cache; the file is truncated under them."""
    import threading

    cache = fastmmap.Cache(path, serializer="raw")
    other = fastmmap.Cache(path + ".other", page_size=PAGE_SIZE, num_pages=NUM_PAGES, serializer="raw")
    stop = threading.Event()
    working = [threading.Event() for _ in range(4)]
    outcome: dict[int, str] = {}
    ops = [0] * 4

    def run(t: int) -> None:
        rng = random.Random(t)
        try:
            while not stop.is_set():
                key = rng.choice(KEYS)
                r = rng.random()
                if r < 0.4:
                    got = cache.get(key)
                    assert got is None or good(key, got), f"bad value {got!r:.100}"
                elif r < 0.8:
                    cache.set(key, make_value(key, rng))
                else:
                    with cache.lock(key) as held:
                        old = held.value
                        assert old is None or good(key, old), f"bad value {old!r:.100}"
                        held.value = make_value(key, rng)
                ops[t] += 1
                if ops[t] == 20:
                    working[t].set()
            outcome[t] = "stopped"
        except fastmmap.FileReplacedError:
            outcome[t] = "FileReplacedError"
        except BaseException as e:  # noqa: BLE001 - reported to the test
            outcome[t] = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    # truncate once every thread works on the mapping; each must then end
    # by itself with FileReplacedError (the stop is for a failed test)
    started = all(e.wait(HANG_SECONDS) for e in working)
    os.truncate(path, 4096 + PAGE_SIZE + 100)
    _join_all(threads, HANG_SECONDS)
    stop.set()
    _join_all(threads, HANG_SECONDS)
    alive = sum(t.is_alive() for t in threads)
    # the other cache of the process keeps working
    other.set("x", b"y")
    ok_other = other.get("x") == b"y"
    cache.close()
    other.close()
    return {"outcome": outcome, "alive": alive, "ops": sum(ops), "other": ok_other, "started": started}


@pytest.mark.timeout(600)
def test_truncate_under_threads_of_one_process(tmp_path, forked):
    path = str(tmp_path / "cache.fmm")
    fastmmap.Cache(path, page_size=PAGE_SIZE, num_pages=NUM_PAGES, init_file=True, unlink_on_exit=False).close()
    r = forked(_threads_then_truncate, path, timeout=4 * HANG_SECONDS)
    assert r["started"], r
    assert r["alive"] == 0, r
    assert r["other"], r
    assert r["ops"] > 0, r
    assert sorted(r["outcome"].values()) == ["FileReplacedError"] * 4, r


def _many_caches_then_truncate(path: str, n: int) -> dict:
    caches = [fastmmap.Cache(path, serializer="raw") for _ in range(n)]
    os.truncate(path, 0)
    outcome = {}
    for i in (n - 1, 0, n // 2):  # the last opened, the first, one between
        try:
            caches[i].set("k", b"v")
            outcome[i] = "stored"
        except fastmmap.FileReplacedError:
            outcome[i] = "FileReplacedError"
    for c in caches:
        c.close()
    return outcome


@pytest.mark.timeout(60)
def test_truncate_under_hundreds_of_caches_of_one_process(tmp_path, forked):
    # Each Cache is one guarded mapping: well past the guard's first table
    # chunk, every one must stay guarded.
    path = str(tmp_path / "cache.fmm")
    fastmmap.Cache(path, page_size=PAGE_SIZE, num_pages=1, init_file=True, unlink_on_exit=False).close()
    n = 300
    r = forked(_many_caches_then_truncate, path, n, timeout=30)
    assert r == {n - 1: "FileReplacedError", 0: "FileReplacedError", n // 2: "FileReplacedError"}, r


def _key_on_page(path: str, page: int) -> str:
    with fastmmap.Cache(path, serializer="raw") as c:
        for i in range(10000):
            key = f"k{i}"
            before = c._page_info(page)["live"]
            c.set(key, b"x")
            if c._page_info(page)["live"] > before:
                return key
    raise AssertionError(f"no key for page {page}")


def _wait_behind_a_holder_that_lost_the_file(path: str, key: str, cut: int) -> str:
    """A forked holder of key's page loses its mapping to a cut through that
    page (past the lock word, which stays in the file) and stays alive;
    this process then waits for the page's lock, without a lock_timeout."""
    to_test_r, to_test_w = os.pipe()
    to_holder_r, to_holder_w = os.pipe()
    waiter = fastmmap.Cache(path, serializer="raw")
    waiter.get("mapped before the cut")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            # only our ends: if the test dies, our read sees the end of the pipe
            os.close(to_test_r)
            os.close(to_holder_w)
            holder = fastmmap.Cache(path, serializer="raw")
            try:
                with holder.lock(key) as held:
                    os.write(to_test_w, b"L")
                    os.read(to_holder_r, 1)  # the file is cut now
                    held.value = os.urandom(3000)  # reaches past the cut
            except fastmmap.FileReplacedError:
                code = 0
            os.write(to_test_w, b"R" if code == 0 else b"?")
            os.read(to_holder_r, 1)  # alive, its TID in the lock word, until the end
        finally:
            os._exit(code)
    os.close(to_test_w)
    os.close(to_holder_r)
    try:
        assert os.read(to_test_r, 1) == b"L"
        os.truncate(path, cut)
        os.write(to_holder_w, b"g")
        assert os.read(to_test_r, 1) == b"R", "the holder did not get FileReplacedError"
        try:
            waiter.get(key)
            return "got the page"
        except fastmmap.FileReplacedError:
            return "FileReplacedError"
    finally:
        os.close(to_holder_w)  # the holder's last read ends
        os.close(to_test_r)
        _, st = os.waitpid(pid, 0)
        assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0, st


@pytest.mark.timeout(120)
def test_lock_waiter_sees_the_truncation_that_its_holder_hit(tmp_path, forked):
    # The holder cannot unlock a word it no longer maps, and the waiter
    # only touches the word (still in the file), so no SIGBUS tells it:
    # it must notice the shorter file by itself, not wait forever.
    path = str(tmp_path / "cache.fmm")
    fastmmap.Cache(path, page_size=PAGE_SIZE, num_pages=NUM_PAGES, init_file=True, unlink_on_exit=False).close()
    key = _key_on_page(path, 2)
    cut = 4096 + 2 * PAGE_SIZE + PAGE_SIZE // 2  # the middle of page 2
    assert forked(_wait_behind_a_holder_that_lost_the_file, path, key, cut, timeout=60) == "FileReplacedError"
