"""Kill storm: processes SIGKILLed at random moments while they hammer a small cache.

Eight forked workers run random set / get / get_and_set / get_and_remove /
remove / ``with cache.lock(k)`` operations on a cache of four 8 KiB pages (so
pages compact and evict all the time) while the supervisor (the test process)
SIGKILLs a random worker every 2-10 ms and forks a replacement.

Every value carries a checksum of its key and payload, so a torn, stale-mixed
or misplaced value is detected by whoever reads it.  A worker that reads a bad
value, or raises anything at all, writes a marker file and exits non-zero; the
supervisor also fails the test for any worker death other than its own
SIGKILL.  Hangs: a watchdog fails the test when a live worker, or all of them,
complete no operation for ``HANG_SECONDS``; since killable workers rarely live
that long, a ninth "sentinel" worker that is never killed runs the same
operations with ``lock_timeout=HANG_SECONDS``, so a page lock that is never
released (a deadlock, a lost robust-mutex wake-up) fails the test too.  At the
end every page must pass ``check()`` and every value left in the cache must
verify.

Duration: ``FASTMMAP_STORM_SECONDS`` (default 60) for the normal test; the
``stress``-marked variant (``make stress``) runs 600 s.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import pickle
import platform
import random
import signal
import struct
import time
import traceback

import pytest

import fastmmap

STORM_SECONDS = float(os.environ.get("FASTMMAP_STORM_SECONDS", "60"))
STRESS_SECONDS = 600.0

N_WORKERS = 8
N_SLOTS = 64  # counter slots: a killed worker's slot is reused once it is reaped
PAGE_SIZE = 8192
NUM_PAGES = 4
KEYS = [f"key-{i}" for i in range(48)] + [f"k{i}".encode() for i in range(16)]
MAX_PAYLOAD = 1500  # four 8 KiB pages hold far less than 64 keys of this
KILL_INTERVAL = (0.002, 0.010)
HANG_SECONDS = 10.0  # no progress for this long while not killed = a hang
WORKER_LOCK_TIMEOUT = 60.0  # far above HANG_SECONDS: the watchdog fires first
STOP_GRACE = 30.0  # time for all workers to finish after the stop flag
WORKER_NICENESS = 10

# Shared counters (an anonymous MAP_SHARED mapping of uint64): index 0 is the
# stop flag, then N_FIELDS per worker slot.
F_OPS, F_HITS, F_INBODY, N_FIELDS = 0, 1, 2, 3

# Offsets in the file, for the post-mortem look at a killed worker's page
# (see fmm.h): page headers start at 4096; the page's uint16 `dirty` is at 42
# (after glibc's 40-byte mutex on x86_64) and the robust mutex's owner TID at 8.
FILE_HEADER = 4096
PH_DIRTY = 42
GLIBC_MUTEX_OWNER = 8


# ---------------------------------------------------------------- values


def _digest(key, payload: bytes) -> bytes:
    kb = key.encode() if isinstance(key, str) else key
    return hashlib.sha1(kb + b"\x00" + payload).digest()[:8]


def make_value(key, rng: random.Random):
    """A self-checking value of one of three stored types (bytes, str, pickle)."""
    payload = rng.randbytes(rng.choice((0, 1, 7, rng.randint(0, 200), rng.randint(0, MAX_PAYLOAD))))
    kind = rng.random()
    if kind < 0.5:
        return payload + _digest(key, payload)
    if kind < 0.75:
        return payload.hex() + ":" + _digest(key, payload).hex()
    return ("v1", key, payload, _digest(key, payload))


class BadValue(AssertionError):
    pass


def verify(key, value) -> bool:
    """True for a good value, False for a miss; raise BadValue for anything else."""
    if value is None:
        return False
    if isinstance(value, bytes):
        if len(value) >= 8 and _digest(key, value[:-8]) == value[-8:]:
            return True
    elif isinstance(value, str):
        head, sep, tail = value.rpartition(":")
        try:
            if sep and _digest(key, bytes.fromhex(head)).hex() == tail:
                return True
        except ValueError:
            pass
    elif isinstance(value, tuple):
        if (
            len(value) == 4
            and value[0] == "v1"
            and value[1] == key
            and isinstance(value[2], bytes)
            and _digest(key, value[2]) == value[3]
        ):
            return True
    raise BadValue(f"bad value for key {key!r}: {value!r:.300}")


# ---------------------------------------------------------------- worker


def _worker(path, inherited, slot, seed, shared, faildir, lock_timeout, niceness):
    """Run random operations until the stop flag is set.  Never returns."""
    code = 0
    try:
        os.nice(niceness)  # keep the supervisor's kill timing close to the plan
        counters = memoryview(shared).cast("Q")
        base = 1 + slot * N_FIELDS
        ops, hits, inbody = base + F_OPS, base + F_HITS, base + F_INBODY
        rng = random.Random(seed)
        if inherited is not None:
            c = inherited  # the parent's handle, inherited through fork
        else:
            c = fastmmap.Cache(path, lock_timeout=lock_timeout)

        def replace(key, old):
            if verify(key, old):
                counters[hits] += 1
            return make_value(key, rng)

        while not counters[0]:
            key = rng.choice(KEYS)
            r = rng.random()
            if r < 0.25:
                if c.set(key, make_value(key, rng)) is not True:
                    raise AssertionError(f"set({key!r}) did not store a value that fits")
            elif r < 0.50:
                if verify(key, c.get(key)):
                    counters[hits] += 1
            elif r < 0.63:
                verify(key, c.get_and_set(key, replace))
            elif r < 0.68:
                if verify(key, c.get_and_remove(key)):
                    counters[hits] += 1
            elif r < 0.78:
                c.remove(key)
            else:
                with c.lock(key) as e:
                    counters[inbody] = 1  # from here until cleared, the page lock is held
                    if verify(key, e.value):
                        counters[hits] += 1
                    what = rng.random()
                    if what < 0.6:
                        e.value = make_value(key, rng)
                        if verify(key, e.value):
                            counters[hits] += 1
                    elif what < 0.75:
                        del e.value
                    counters[inbody] = 0
            counters[ops] += 1
    except BaseException:  # noqa: BLE001 - every exception is a failure here
        code = 3
        try:
            tmp = os.path.join(faildir, f"{os.getpid()}.tmp")
            with open(tmp, "w") as f:
                f.write(f"worker slot {slot} pid {os.getpid()} seed {seed}:\n{traceback.format_exc()}")
            os.replace(tmp, os.path.join(faildir, f"{os.getpid()}.txt"))
        except BaseException:  # noqa: BLE001
            pass
    finally:
        os._exit(code)


# ---------------------------------------------------------------- supervisor


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"killed by signal {signal.Signals(sig).name}"
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    return f"wait status {status:#x}"


def _failures(faildir) -> list[str]:
    out = []
    for name in sorted(os.listdir(faildir)):
        if name.endswith(".txt"):
            with open(os.path.join(faildir, name)) as f:
                out.append(f.read())
    return out


def run_storm(tmp_path, seconds: float, capsys) -> dict:
    seed = int(os.environ.get("FASTMMAP_TEST_SEED") or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)
    path = str(tmp_path / "storm.fmm")
    faildir = str(tmp_path / "failures")
    os.mkdir(faildir)
    cache = fastmmap.Cache(path, page_size=PAGE_SIZE, num_pages=NUM_PAGES, lock_timeout=WORKER_LOCK_TIMEOUT)
    shared = mmap.mmap(-1, 8 * (1 + N_SLOTS * N_FIELDS))
    counters = memoryview(shared).cast("Q")
    # A read-only view of the file for the post-mortem of each killed worker.
    with open(path, "rb") as f:
        view = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    glibc = platform.libc_ver()[0] == "glibc"

    live: dict[int, int] = {}  # pid -> counter slot, workers not yet killed
    sentinels: dict[int, int] = {}  # pid -> counter slot, the worker that is never killed
    dying: dict[int, int] = {}  # pid -> counter slot, killed, not yet reaped
    free_slots = list(range(N_SLOTS))
    problems: list[str] = []
    stats = dict(seed=seed, kills=0, kills_in_lock_block=0, kills_holding_lock=0, kills_mid_write=0, spawned=0)

    def field(slot: int, f: int) -> int:
        return 1 + slot * N_FIELDS + f

    def spawn(sentinel: bool = False) -> None:
        slot = free_slots.pop()
        counters[field(slot, F_INBODY)] = 0
        # Half the workers inherit the handle, half open the file afresh.
        # The sentinel is never killed; it waits at most HANG_SECONDS for a
        # page, so that a lost lock fails the test with LockTimeout.
        inherited = cache if stats["spawned"] % 2 and not sentinel else None
        timeout = HANG_SECONDS if sentinel else WORKER_LOCK_TIMEOUT
        wseed = rng.randrange(2**63)
        stats["spawned"] += 1
        pid = os.fork()
        if pid == 0:
            try:
                _worker(path, inherited, slot, wseed, shared, faildir, timeout, 0 if sentinel else WORKER_NICENESS)
            finally:
                os._exit(98)
        (sentinels if sentinel else live)[pid] = slot

    def post_mortem(pid: int, slot: int) -> None:
        """Where was the dead worker?  In a lock block, holding a page, mid-write?"""
        if counters[field(slot, F_INBODY)]:
            stats["kills_in_lock_block"] += 1
        free_slots.insert(0, slot)
        if not glibc:
            return
        # A waiter may already have taken the page over: these counts are
        # lower bounds.
        for p in range(NUM_PAGES):
            off = FILE_HEADER + p * PAGE_SIZE
            (dirty,) = struct.unpack_from("H", view, off + PH_DIRTY)
            (owner,) = struct.unpack_from("i", view, off + GLIBC_MUTEX_OWNER)  # read after dirty
            if owner == pid:
                stats["kills_holding_lock"] += 1
                if dirty:
                    # Died holding the lock mid-write: whoever locks the page
                    # next (check() at the latest) must re-initialise it.
                    stats["kills_mid_write"] += 1

    def reap(pids: dict[int, int], expect_kill: bool) -> None:
        for pid, slot in list(pids.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done:
                continue
            del pids[pid]
            if expect_kill:
                if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
                    problems.append(f"worker pid {pid} {_describe_status(status)} before our SIGKILL")
                post_mortem(pid, slot)
            else:
                problems.append(f"worker pid {pid} {_describe_status(status)} without being killed")
                free_slots.insert(0, slot)

    def total(f: int) -> int:
        return sum(counters[field(s, f)] for s in range(N_SLOTS))

    start = time.monotonic()
    try:
        for _ in range(N_WORKERS):
            spawn()
        spawn(sentinel=True)
        deadline = start + seconds
        last_total, last_progress = -1, time.monotonic()
        per_worker: dict[int, tuple[int, float]] = {}  # pid -> (ops, since)
        next_kill = time.monotonic()
        while not problems and time.monotonic() < deadline:
            # Kill times follow a fixed random schedule: a late wake-up (a
            # busy machine) is caught up on, not added to every interval.
            next_kill = max(next_kill + rng.uniform(*KILL_INTERVAL), time.monotonic() - 0.1)
            time.sleep(max(0.0, next_kill - time.monotonic()))
            reap(live, expect_kill=False)  # deaths we did not cause
            reap(sentinels, expect_kill=False)
            reap(dying, expect_kill=True)
            while len(live) < N_WORKERS and free_slots:
                spawn()
            if not live:  # every slot is still waiting for a dead worker to be reaped
                continue
            # Kill one; it is reaped (and examined) on a later round, so that
            # slow process teardown does not slow the storm down.
            pid = rng.choice(list(live))
            os.kill(pid, signal.SIGKILL)
            dying[pid] = live.pop(pid)
            stats["kills"] += 1
            if free_slots:
                spawn()
            # Watchdog: all operations stalled, or one live worker stuck.
            now = time.monotonic()
            tot = total(F_OPS)
            if tot != last_total:
                last_total, last_progress = tot, now
            elif now - last_progress > HANG_SECONDS:
                problems.append(f"no operation completed in {HANG_SECONDS}s: hang (deadlock or lost lock?)")
            for p, s in list(live.items()) + list(sentinels.items()):
                ops = counters[field(s, F_OPS)]
                old = per_worker.get(p)
                if old is None or old[0] != ops:
                    per_worker[p] = (ops, now)
                elif now - old[1] > HANG_SECONDS:
                    problems.append(f"worker pid {p} made no progress for {HANG_SECONDS}s: hang")
            for p in list(per_worker):
                if p not in live and p not in sentinels:
                    del per_worker[p]
            if _failures(faildir):
                break
        # Orderly stop (unless already failed): every live worker must finish
        # its operation and exit 0.
        counters[0] = 1
        stop_deadline = time.monotonic() + STOP_GRACE
        live.update(sentinels)
        sentinels.clear()
        while (live or dying) and not problems and not _failures(faildir):
            reap(dying, expect_kill=True)
            for pid, slot in list(live.items()):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    del live[pid]
                    if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
                        problems.append(f"worker pid {pid} {_describe_status(status)} at the stop")
            if (live or dying) and time.monotonic() > stop_deadline:
                problems.append(f"workers {sorted(live)} did not stop in {STOP_GRACE}s: hang")
                break
            time.sleep(0.01)
    finally:
        for pid in list(live) + list(dying) + list(sentinels):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
    stats["seconds"] = round(time.monotonic() - start, 1)
    stats["ops"] = total(F_OPS)
    stats["checked"] = total(F_HITS)

    problems = _failures(faildir) + problems
    try:
        if not problems:
            # The final state: every page valid (check() locks each page, so a
            # page left dirty by the last kills is repaired here), every value
            # intact, from this handle and from a fresh one.
            problems += [f"check(): {p}" for p in cache.check()]
            for k in KEYS:
                try:
                    verify(k, cache.get(k))
                except BadValue as e:
                    problems.append(f"after the storm: {e}")
            fresh = fastmmap.Cache(path, lock_timeout=5)
            try:
                problems += [f"check() from a fresh handle: {p}" for p in fresh.check()]
                for d in fresh.get_keys(2):
                    try:
                        verify(d["key"], d["value"])
                    except BadValue as e:
                        problems.append(f"after the storm, get_keys(2): {e}")
                assert fresh.set("after-the-storm", b"ok") and fresh.get("after-the-storm") == b"ok"
            finally:
                fresh.close()
        stats["repairs"] = cache.repaired_pages()
    finally:
        view.close()
        counters.release()
        shared.close()
        cache.close()

    summary = (
        f"kill storm: {stats['seconds']}s, {stats['kills']} kills "
        f"({stats['kills_holding_lock']} seen holding a page lock, {stats['kills_in_lock_block']} inside "
        f"lock blocks, {stats['kills_mid_write']} mid-write), "
        f"{stats['ops']} operations, {stats['checked']} values checked, {stats['repairs']} repairs "
        f"[FASTMMAP_TEST_SEED={seed}]"
    )
    with capsys.disabled():
        print("\n" + summary)
    if problems:
        pytest.fail(summary + "\n" + "\n".join(problems[:10]), pytrace=False)
    return stats


def _assert_storm(stats: dict) -> None:
    assert stats["kills"] > 0 and stats["ops"] > 0, stats
    # A repair needs a page whose holder died (one page per dead worker) or a
    # page that failed validation (which only a bug could cause).
    assert stats["repairs"] <= stats["kills"], stats
    if stats["kills_mid_write"]:
        # A worker died holding a page lock with the page marked dirty: that
        # page must have been re-initialised by the next locker.
        assert stats["repairs"] >= 1, stats


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(STORM_SECONDS + 60)
def test_kill_storm(tmp_path, capsys):
    _assert_storm(run_storm(tmp_path, STORM_SECONDS, capsys))


@pytest.mark.stress
@pytest.mark.multiprocess
@pytest.mark.timeout(STRESS_SECONDS + 60)
def test_kill_storm_long(tmp_path, capsys):
    _assert_storm(run_storm(tmp_path, STRESS_SECONDS, capsys))


# ---------------------------------------------------------------- the checker itself


def test_value_checksums_catch_torn_and_misplaced_values():
    rng = random.Random(1)
    for _ in range(200):
        v = make_value("a", rng)
        assert verify("a", v) is True
        assert verify("a", pickle.loads(pickle.dumps(v))) is True
        with pytest.raises(BadValue):
            verify("b", v)  # another key's value
        if isinstance(v, bytes) and len(v) > 8:
            with pytest.raises(BadValue):
                verify("a", v[:-9] + bytes([v[-9] ^ 1]) + v[-8:])  # one flipped bit
            with pytest.raises(BadValue):
                verify("a", v[1:])  # torn
    assert verify("a", None) is False
    with pytest.raises(BadValue):
        verify("a", 42)
