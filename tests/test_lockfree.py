"""Lock-free reads (csrc/fmm.h: "Lock-free reads", "LRU", fmm_get_optimistic).

``cache.get``, ``cache[key]`` and ``key in cache`` first read the page
without its lock, under the page's sequence word (odd while any process
holds the page lock): a copy made while the word moved is thrown away and
read again, and after two tries, or whenever the engine says so, the read
takes the lock.  Reads stamp the page's current LRU clock only when the
entry's stamp is stale (stores advance the clock), through the locked path.

What is tested here, with real processes:

- torn reads never escape: writers rewrite, compact and evict pages while
  readers check every value they get (bytes, multi-byte str and pickled
  values, each carrying a checksum of its key and content);
- a process killed while it holds a page lock: readers of that page do not
  hang, and get the last good value or, if the page was left mid-write,
  nothing (the page is repaired, and counted);
- what did not change: cache calls inside a lock block raise as before,
  read_cb runs on a miss under the page lock, enable_stats counts gets,
  expired entries read as missing, a key read regularly is not evicted;
- LRU restamping across processes: a key another process keeps reading
  survives a stream of stores into its one-page cache.

Some tests read the page header's sequence word straight from the file
(fmm.h, "Page layout": uint16 magic 0x5046 right after the mutex, uint16
dirty, then uint32 num_slots, live, seq): a read that took the page lock
moves it on by 2, a lock-free read leaves it (and the whole page) as it was.

Every child process is waited for with a timeout (the ``forked`` fixture):
a hang fails the test as a "possible deadlock".
"""

from __future__ import annotations

import os
import pickle
import random
import select
import signal
import struct
import time
import zlib
from contextlib import contextmanager

import pytest

import fastmmap

pytestmark = pytest.mark.timeout(120)

# Seconds of the reader/writer run of the torn-read test.
TORN_SECONDS = float(os.environ.get("FASTMMAP_LOCKFREE_SECONDS", "3"))
T0 = 1_700_000_000  # a frozen clock for the tests that set one (in the past)
FILE_HEADER = 4096
PAGE_MAGIC = 0x5046
PIPE_TIMEOUT = 30.0


# ---------------------------------------------------------------- helpers


class PageHeaders:
    """The page headers of a cache file, read (and poked) with pread/pwrite.

    The file is mapped MAP_SHARED by every process, so the file's page cache
    is the memory they all use: pread sees their stores at once.
    """

    def __init__(self, path: str, page_size: int) -> None:
        self.fd = os.open(path, os.O_RDWR)
        self.page_size = page_size
        # The fields follow the mutex: 40 bytes with glibc on x86_64, padded
        # to 64 where pthread_mutex_t is larger.
        for base in (40, 64):
            if self._u16(0, base) == PAGE_MAGIC:
                self.base = base
                break
        else:  # pragma: no cover - a layout this test does not know
            raise AssertionError("page magic not found after the mutex: page header layout changed?")

    def close(self) -> None:
        os.close(self.fd)

    def _off(self, page: int, field: int) -> int:
        return FILE_HEADER + page * self.page_size + field

    def _u16(self, page: int, field: int) -> int:
        return struct.unpack("H", os.pread(self.fd, 2, self._off(page, field)))[0]

    def seq(self, page: int) -> int:
        return struct.unpack("I", os.pread(self.fd, 4, self._off(page, self.base + 12)))[0]

    def dirty(self, page: int) -> int:
        return self._u16(page, self.base + 2)

    def set_dirty(self, page: int) -> None:
        """Mark the page mid-write, as a store does before its first byte."""
        os.pwrite(self.fd, struct.pack("H", 1), self._off(page, self.base + 2))

    def page_bytes(self, page: int) -> bytes:
        return os.pread(self.fd, self.page_size, self._off(page, 0))


@pytest.fixture
def headers():
    opened: list[PageHeaders] = []

    def open_(c: fastmmap.Cache) -> PageHeaders:
        assert c.share_file is not None
        h = PageHeaders(c.share_file, c.page_size)
        opened.append(h)
        return h

    yield open_
    for h in opened:
        h.close()


def page_of(c: fastmmap.Cache, key) -> int:
    with fastmmap._fastmmap.PageLock(c, key) as lk:
        page = lk._page
    assert page is not None
    return page


def keys_on_pages(c: fastmmap.Cache, prefix: str, want: dict[int, int]) -> dict[int, list[str]]:
    """{page: [keys]}: want[page] keys named prefix<n> whose page is `page`."""
    out: dict[int, list[str]] = {p: [] for p in want}
    n = 0
    while any(len(out[p]) < want[p] for p in want):
        k = f"{prefix}{n}"
        n += 1
        p = page_of(c, k)
        if p in out and len(out[p]) < want[p]:
            out[p].append(k)
        assert n < 100_000, "could not spread keys over the pages"
    return out


def seq_moves(h: PageHeaders, page: int, fn) -> int:
    """How far fn() moved the page's sequence word (0: it never locked the page)."""
    before = h.seq(page)
    fn()
    after = h.seq(page)
    assert before % 2 == 0 and after % 2 == 0, (before, after)
    return (after - before) & 0xFFFFFFFF


@contextmanager
def pipe_pair():
    fds = os.pipe()
    try:
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


def read_exactly(fd: int, n: int, timeout: float = PIPE_TIMEOUT) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while len(buf) < n:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"no answer on the pipe in {timeout}s: possible deadlock")
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise AssertionError("pipe closed early (the other side died?)")
        buf += chunk
    return buf


# ---------------------------------------------------------------- self-checking values

# 1, 2, 3 and 4 bytes in UTF-8: a copy cut anywhere is likely invalid UTF-8.
MULTIBYTE = "aé€😀ß中ñ🐍"


def _digest(key: str, data: bytes) -> bytes:
    """8 bytes: CRC-32 of key and data, and the data's length (cheap, so
    that readers spend their time reading)."""
    return struct.pack("<II", zlib.crc32(data, zlib.crc32(key.encode() + b"\0")), len(data))


def value_bytes(key: str, rng: random.Random, size: int) -> bytes:
    body = f"{key}:{size}:".encode() + rng.randbytes(size)
    return body + _digest(key, body)


def value_str(key: str, rng: random.Random, nbytes: int) -> str:
    """About nbytes of UTF-8 (at most 3 more) in characters of 1 to 4 bytes."""
    chars, n = [], 0
    while n < nbytes:
        ch = rng.choice(MULTIBYTE)
        chars.append(ch)
        n += len(ch.encode())
    head = f"{key}:{nbytes}:" + "".join(chars)
    return head + "#" + _digest(key, head.encode()).hex()


def value_obj(key: str, rng: random.Random, size: int) -> dict:
    blob = rng.randbytes(size)
    return {"key": key, "size": size, "blob": blob, "sum": _digest(key, blob)}


def make_value(key: str, rng: random.Random, size: int, weights=(1, 1, 1)):
    """A value of about size bytes (at most ~100 more): bytes, str or a
    pickled dict, chosen with these weights."""
    kind = rng.choices(range(3), weights)[0]
    if kind == 0:
        return value_bytes(key, rng, size)
    if kind == 1:
        return value_str(key, rng, size)
    return value_obj(key, rng, size)


def stored_size(v) -> int:
    """Bytes of the stored value (no compressor; pickled with the highest protocol)."""
    if isinstance(v, bytes):
        return len(v)
    if isinstance(v, str):
        return len(v.encode())
    return len(pickle.dumps(v, pickle.HIGHEST_PROTOCOL))


def entry_size(key: str, v) -> int:
    """Bytes of the entry in its page (fmm.h, "Entry")."""
    return (20 + len(key.encode()) + stored_size(v) + 3) & ~3


class BadValue(AssertionError):
    pass


def verify(key: str, v) -> str | None:
    """The value's type name if v is an intact value of key, None for a miss;
    raise BadValue for anything else."""
    if v is None:
        return None
    if type(v) is bytes:
        if len(v) >= 8 and v.startswith(key.encode() + b":") and _digest(key, v[:-8]) == v[-8:]:
            return "bytes"
    elif type(v) is str:
        head, sep, tail = v.rpartition("#")
        if sep and head.startswith(key + ":") and _digest(key, head.encode("utf-8", "surrogatepass")).hex() == tail:
            return "str"
    elif type(v) is dict:
        if (
            set(v) == {"key", "size", "blob", "sum"}
            and v["key"] == key
            and type(v["blob"]) is bytes
            and len(v["blob"]) == v["size"]
            and _digest(key, v["blob"]) == v["sum"]
        ):
            return "dict"
    raise BadValue(f"bad value for key {key!r}: {v!r:.300}")


def test_the_value_checks_catch_torn_and_misplaced_values():
    rng = random.Random(7)
    for _ in range(300):
        v = make_value("a", rng, rng.randint(0, 500))
        assert verify("a", v) in ("bytes", "str", "dict")
        with pytest.raises(BadValue):
            verify("b", v)  # another key's value
        if isinstance(v, bytes) and len(v) > 12:
            cut = rng.randrange(2, len(v) - 9)
            with pytest.raises(BadValue):
                verify("a", v[:cut] + bytes([v[cut] ^ 1]) + v[cut + 1:])
            with pytest.raises(BadValue):
                verify("a", v[:-1])
        if isinstance(v, str) and len(v) > 30:
            cut = rng.randrange(5, len(v) - 18)
            with pytest.raises(BadValue):
                verify("a", v[:cut] + "x" + v[cut + 1:])
        if isinstance(v, dict) and v["size"]:
            with pytest.raises(BadValue):
                verify("a", dict(v, blob=v["blob"][:-1] + bytes([v["blob"][-1] ^ 1])))
    assert verify("a", None) is None
    with pytest.raises(BadValue):
        verify("a", 42)


# ---------------------------------------------------------------- 1. torn reads never escape

# The shared page (page 0 of a 64 KiB-page cache) holds, and can always hold
# without evicting: 4 read-mostly keys (values of 3.6-4 KB, mostly str),
# 4 keys the writers rewrite all the time (2.6-3 KB), 3 ballast entries of
# 5 KB and 300 tiny fillers.  It is about 90% full, so every few stores
# compact it, moving its entries while readers may be copying one: what a
# torn read needs.  The fillers matter too: a page with many live
# entries spans many clock ticks, so most reads find their LRU stamp fresh
# and stay lock-free (in a page of a few entries, rewritten all the time,
# most reads would go to the lock).  Page 1 holds 12 churn keys of up to
# 16 KB: it evicts all the time.
TORN_PAGE_SIZE = 65536
N_READ, N_WRITE, N_BALLAST, N_FILL, N_CHURN = 4, 4, 3, 300, 12


def _writer(c, pools, w_keys, r_keys, churn, seed, t_end):
    """Rewrite keys (mostly of the shared page) until t_end; return counts."""
    rng = random.Random(seed)
    counts = {"set": 0, "setitem": 0, "remove": 0}
    while time.monotonic() < t_end:
        for _ in range(50):
            r = rng.random()
            k = rng.choice(w_keys if r < 0.45 else r_keys if r < 0.55 else churn)
            v = rng.choice(pools[k])
            if r >= 0.55 and rng.random() < 0.03:
                c.remove(k)
                counts["remove"] += 1
            elif rng.random() < 0.5:
                assert c.set(k, v) is True, f"set({k!r}) of {stored_size(v)} bytes was not stored"
                counts["set"] += 1
            else:
                c[k] = v
                counts["setitem"] += 1
    return counts


def _reader(c, path, r_keys, w_keys, rest, churn, seed, t_end):
    """get or [] of a random key, then `in` of 3 keys of the shared page, until
    t_end, checking every answer; return counts.

    The keys of the shared page are always present: a miss is a failure.
    Churn keys may be missing (evicted or removed).  c is None: open the
    file afresh (a mapping of this process's own).  `in` is cheap and its
    window (a probe) short, hence more of them."""
    if c is None:
        c = fastmmap.Cache(path, lock_timeout=20)
    rng = random.Random(seed)
    shared = r_keys + w_keys + rest
    n = {"get": 0, "getitem": 0, "in": 0, "hits": 0, "misses": 0, "bytes": 0, "str": 0, "dict": 0}
    while time.monotonic() < t_end:
        for _ in range(50):
            r = rng.random()
            if r < 0.60:
                k, must = rng.choice(r_keys), True
            elif r < 0.75:
                k, must = rng.choice(w_keys), True
            elif r < 0.80:
                k, must = rng.choice(rest), True
            else:
                k, must = rng.choice(churn), False
            if n["get"] <= n["getitem"]:
                n["get"] += 1
                v = c.get(k)
            else:
                n["getitem"] += 1
                try:
                    v = c[k]
                except KeyError:
                    v = None
            try:
                kind = verify(k, v)
            except BadValue as e:
                raise BadValue(f"{e}; after {n}") from None
            if kind is None:
                if must:
                    raise AssertionError(f"{k!r} read as missing, but the key is always present; after {n}")
                n["misses"] += 1
            else:
                n["hits"] += 1
                n[kind] += 1
            for k in rng.choices(shared, k=3):
                n["in"] += 1
                present = k in c
                if present is not True:
                    raise AssertionError(f"{k!r} in cache returned {present!r}, but the key is always there; after {n}")
    return n


@pytest.mark.multiprocess
@pytest.mark.slow
def test_torn_reads_never_escape(cache, forked, rand):
    """Two writers keep rewriting (and so compacting) a nearly full page and
    evicting from another, while two readers get / [] / `in` and check every
    answer.  A copy torn by a concurrent write that got past the sequence
    check would show up as a bad checksum, a UnicodeDecodeError (a
    multi-byte str cut anywhere), an exception from unpickling, or an
    always-present key reading as missing.  (Against an engine whose
    fmm_read_valid always says yes, or whose lock leaves seq even, or whose
    reader ignores an odd seq, this fails within a second or so.)"""
    path = cache.path()
    c = cache(path, num_pages=2, page_size=TORN_PAGE_SIZE, lock_timeout=20)
    by_page = keys_on_pages(c, "k", {0: N_READ + N_WRITE + N_BALLAST + N_FILL, 1: N_CHURN})
    shared, churn = by_page[0], by_page[1]
    r_keys, w_keys, rest = shared[:N_READ], shared[N_READ:N_READ + N_WRITE], shared[N_READ + N_WRITE:]
    pools = {}
    for k in r_keys:
        pools[k] = [make_value(k, rand, rand.randint(3600, 4000), (1, 2, 1)) for _ in range(12)]
    for k in w_keys:
        pools[k] = [make_value(k, rand, rand.randint(2600, 3000)) for _ in range(11)] + [make_value(k, rand, 0)]
    for k in churn:
        sizes = [0, 1] + [rand.randint(0, 16000) for _ in range(5)] + [rand.randint(8000, 16000) for _ in range(5)]
        pools[k] = [make_value(k, rand, size) for size in sizes]
    for k in rest[:N_BALLAST]:
        c[k] = make_value(k, rand, 5000)
    for k in rest[N_BALLAST:]:
        c[k] = value_bytes(k, rand, rand.randint(0, 4))
    for k in r_keys + w_keys + churn:
        c[k] = pools[k][0]
    # Setup check: even with every key at its largest value the shared page
    # never evicts (a store evicts when the live entries, the new one
    # included, would fill more than 95% of the data area).
    slots = 1 << (2 * (len(shared) + 1) - 1).bit_length()
    data_area = TORN_PAGE_SIZE - 128 - 4 * slots
    worst = sum(max(entry_size(k, v) for v in pools[k]) for k in r_keys + w_keys)
    worst += sum(entry_size(k, c[k]) for k in rest)
    assert worst <= 0.94 * data_area, f"test setup: the shared page could evict ({worst} of {data_area} bytes)"
    assert c._page_info(0)["live"] == len(shared)

    t_end = time.monotonic() + TORN_SECONDS
    seeds = [rand.randrange(2**32) for _ in range(4)]
    writers = [forked.start(_writer, c, pools, w_keys, r_keys, churn, seeds[i], t_end) for i in range(2)]
    readers = [
        forked.start(_reader, c, path, r_keys, w_keys, rest, churn, seeds[2], t_end),  # the inherited handle
        forked.start(_reader, None, path, r_keys, w_keys, rest, churn, seeds[3], t_end),  # its own
    ]
    limit = TORN_SECONDS + 60
    r_counts = [r.result(limit) for r in readers]
    w_counts = [w.result(limit) for w in writers]
    summary = f"readers {r_counts}, writers {w_counts} in {TORN_SECONDS}s [{rand!r}]"
    print(summary)
    for w in w_counts:
        assert w["set"] + w["setitem"] >= 1000, "a writer hardly wrote: " + summary
    for r in r_counts:
        assert r["get"] + r["getitem"] + r["in"] >= 3000, "a reader hardly read: " + summary
        assert min(r["bytes"], r["str"], r["dict"]) >= 20, "a reader saw too few values of some type: " + summary
    # The file is sound, and every key of the shared page holds an intact value.
    assert c.check() == [], summary
    assert c.repaired_pages() == 0, summary
    for k in shared:
        assert verify(k, c.get(k)) is not None, k
    for k in churn:
        verify(k, c.get(k))


# ---------------------------------------------------------------- 2. a holder killed inside a lock block


def _populate_one_page(c, victim_page):
    """Keys: the victim and 10 neighbours on victim_page, 5 on another page."""
    pages = keys_on_pages(c, "n", {victim_page: 11, 1 - victim_page: 5})
    victim, *same = pages[victim_page]
    other = pages[1 - victim_page]
    for k in [victim] + same + other:
        c[k] = f"good:{k}"
    return victim, same, other


def _first_and_then(c, first, victim, same, other):
    """In another process: `first` on the victim's page, then everything else."""
    out = {}
    if first == "get":
        out["first"] = c.get(victim)
    elif first == "getitem":
        try:
            out["first"] = c[victim]
        except KeyError:
            out["first"] = KeyError
    elif first == "contains":
        out["first"] = victim in c
    else:
        out["first"] = c.check()
    out["victim"] = c.get(victim)
    out["same"] = {k: c.get(k) for k in same}
    out["same_in"] = {k: k in c for k in same}
    out["other"] = {k: c.get(k) for k in other}
    out["repairs"] = c.repaired_pages()
    out["check"] = c.check()
    assert c.set("after", "ok") is True and c.get("after") == "ok"
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("first", ["get", "getitem", "contains", "check"])
@pytest.mark.parametrize("mid_write", [False, True], ids=["clean", "mid-write"])
def test_a_holder_killed_in_a_lock_block(cache, forked, headers, first, mid_write):
    """A process SIGKILLs itself inside ``with c.lock(key)`` after storing a
    new value: the page's sequence word stays odd, so lock-free readers go to
    the lock, where the robust mutex hands the page over (EOWNERDEAD).  A
    page left clean keeps its entries, the new value included; a page left
    mid-write (its dirty mark set, as a store does before its first byte) is
    re-initialised and counted by repaired_pages()."""
    path = cache.path()
    c = cache(path, num_pages=2, page_size=8192, lock_timeout=5)
    h = headers(c)
    victim, same, other = _populate_one_page(c, 0)
    page = page_of(c, victim)
    assert h.seq(page) % 2 == 0

    def holder():
        with c.lock(victim) as e:
            e.value = "new"
            if mid_write:
                h.set_dirty(page)
            os.kill(os.getpid(), signal.SIGKILL)

    proc = forked.start(holder)
    status = proc.wait()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    # The lock is still recorded as held: seq is odd.
    assert h.seq(page) % 2 == 1, "a holder that died must leave the sequence word odd"
    assert h.dirty(page) == (1 if mid_write else 0)

    out = forked(_first_and_then, c, first, victim, same, other, timeout=30)

    assert out["other"] == {k: f"good:{k}" for k in other}, "a page nobody locked lost entries"
    if not mid_write:
        expect_first = {"get": "new", "getitem": "new", "contains": True, "check": []}[first]
        assert out["first"] == expect_first
        assert out["victim"] == "new"
        assert out["same"] == {k: f"good:{k}" for k in same}
        assert all(out["same_in"].values())
        assert out["repairs"] == 0
    else:
        if first == "check":
            # check() took the page first: it repaired it, and says so.
            assert len(out["first"]) == 1 and "killed writer" in out["first"][0], out["first"]
        else:
            assert out["first"] == {"get": None, "getitem": KeyError, "contains": False}[first]
        assert out["victim"] is None
        assert out["same"] == {k: None for k in same}
        assert not any(out["same_in"].values())
        assert out["repairs"] == 1
    assert out["check"] == []
    # The page is free and sound again, for this process too.
    assert h.seq(page) % 2 == 0 and h.dirty(page) == 0
    assert c.get("after") == "ok"
    assert c.get(victim) == (None if mid_write else "new")
    assert c.check() == [] and c.repaired_pages() == (1 if mid_write else 0)


def _blocked_reader(path, keys, shared_fd, t_stop):
    """Read keys until t_stop; return (ops, monotonic time of the first answer, values seen)."""
    c = fastmmap.Cache(path, lock_timeout=20)
    ops, first_done, seen = 0, None, set()
    while time.monotonic() < t_stop:
        k = keys[ops % len(keys)]
        kind = ops % 3
        if kind == 0:
            v = c.get(k)
        elif kind == 1:
            v = c[k]
        else:
            v = "present" if k in c else None
        if first_done is None:
            first_done = time.monotonic()
            os.write(shared_fd, b"r")
        seen.add((k, v))
        ops += 1
    return ops, first_done, seen


@pytest.mark.multiprocess
@pytest.mark.slow
def test_readers_waiting_on_a_killed_holder_resume(cache, forked, headers):
    """Readers of a page whose lock another process holds wait for it (the
    sequence word is odd), and carry on with the last good values once the
    parent SIGKILLs the holder."""
    path = cache.path()
    c = cache(path, num_pages=1, page_size=8192, lock_timeout=20)
    h = headers(c)
    keys = [f"key{i}" for i in range(10)]
    for k in keys:
        c[k] = f"good:{k}"
    with pipe_pair() as (r_in, w_in), pipe_pair() as (r_rd, w_rd):

        def holder():
            with c.lock("key0") as e:
                e.value = "good:key0"  # a completed store: nothing is torn
                os.write(w_in, b"i")
                time.sleep(60)

        proc = forked.start(holder)
        read_exactly(r_in, 1)
        t_stop = time.monotonic() + 2.0
        readers = [forked.start(_blocked_reader, path, keys, w_rd, t_stop) for _ in range(2)]
        time.sleep(0.5)
        ready, _, _ = select.select([r_rd], [], [], 0)
        assert not ready, "a reader got an answer while another process held the page lock"
        assert h.seq(0) % 2 == 1
        t_kill = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        results = [r.result(30) for r in readers]
    for ops, first_done, seen in results:
        assert first_done is not None and first_done >= t_kill, "a reader answered before the holder died"
        assert first_done - t_kill < 5, f"readers resumed only {first_done - t_kill:.1f}s after the holder died"
        assert ops >= 100, f"only {ops} reads after the holder died"
        assert seen <= {(k, f"good:{k}") for k in keys} | {(k, "present") for k in keys}, seen
    assert c.check() == [] and c.repaired_pages() == 0
    assert h.seq(0) % 2 == 0
    assert {k: c[k] for k in keys} == {k: f"good:{k}" for k in keys}


# ---------------------------------------------------------------- 3. what did not change


def test_reads_inside_a_lock_block_raise_as_before(cache):
    """A thread that holds a page lock of a cache may not call that cache:
    get, [] and `in` raise RecursiveLockError for a key of any page, present
    or not, as they did when every read took the lock.  Another cache can be
    read."""
    c = cache(num_pages=4, page_size=8192, lock_timeout=1)
    by_page = keys_on_pages(c, "p", {0: 2, 1: 1, 2: 1, 3: 1})
    held, same = by_page[0]
    others = [by_page[p][0] for p in (1, 2, 3)]
    for k in [held, same] + others:
        c[k] = f"v:{k}"
    c2 = cache(num_pages=1, page_size=8192, lock_timeout=1)
    c2["x"] = "in another cache"
    with c.lock(held) as e:
        assert e.value == f"v:{held}"
        for k in [held, same, *others, "absent-key"]:
            with pytest.raises(fastmmap.RecursiveLockError):
                c.get(k)
            with pytest.raises(fastmmap.RecursiveLockError):
                c[k]
            with pytest.raises(fastmmap.RecursiveLockError):
                k in c  # noqa: B015
            with pytest.raises(fastmmap.RecursiveLockError):
                c.get(k, "default")
        assert c2["x"] == "in another cache"
        assert "x" in c2 and c2.get("nope") is None
        e.value = "changed"
    with c2.lock("x"):
        # holding a page of another cache does not stop reads of this one
        assert c.get(held) == "changed" and c[same] == f"v:{same}" and others[0] in c
    assert {k: c.get(k) for k in others} == {k: f"v:{k}" for k in others}


@pytest.mark.multiprocess
def test_read_cb_runs_on_a_miss_under_the_page_lock(cache, forked):
    """A miss with read_cb takes the page lock and calls read_cb under it
    (another process cannot even read a present key of that page meanwhile),
    stores the result, and later gets are hits that do not call it.  `in`
    never calls read_cb."""
    path = cache.path()
    calls = []
    state = {"probe": False}

    with pipe_pair() as (r_go, w_go), pipe_pair() as (r_back, w_back):

        def read_cb(ctx, key):
            calls.append(key)
            if state["probe"]:
                os.write(w_go, b"g")  # let the other process try the page now
                read_exactly(r_back, 1)
            return f"loaded:{key}"

        c = cache(path, num_pages=1, page_size=8192, lock_timeout=5, read_cb=read_cb)
        c["present"] = "here"

        def prober():
            other = fastmmap.Cache(path, lock_timeout=0.3)
            read_exactly(r_go, 1)
            outcome = []
            for op in (lambda: other.get("present"), lambda: other["present"], lambda: "present" in other):
                start = time.monotonic()
                try:
                    outcome.append(("returned", op()))
                except fastmmap.LockTimeout:
                    outcome.append(("LockTimeout", round(time.monotonic() - start, 1)))
            os.write(w_back, b"b")
            return outcome

        proc = forked.start(prober)
        state["probe"] = True
        assert c.get("absent") == "loaded:absent"
        state["probe"] = False
        outcome = proc.result(30)
        assert [o[0] for o in outcome] == ["LockTimeout"] * 3, outcome
    assert calls == ["absent"]
    # stored by the read-through: hits now, in this process and another
    assert c.get("absent") == "loaded:absent" and c["absent"] == "loaded:absent"
    assert forked(lambda: (c.get("absent"), c.get("present"), calls)) == ("loaded:absent", "here", ["absent"])
    assert calls == ["absent"]
    assert c["other"] == "loaded:other"
    assert "never-read" not in c
    assert calls == ["absent", "other"]
    # an expired entry is a miss: read_cb runs again
    c._set_time_override(T0)
    c.set("short", "stored", expire_time=5)
    c._set_time_override(T0 + 5)
    assert c.get("short") == "loaded:short"
    assert calls == ["absent", "other", "short"]


@pytest.mark.multiprocess
def test_enable_stats_counts_gets(cache, forked):
    """With enable_stats every get is a lookup (and a hit if found), in any
    process; `in` is not counted."""
    c = cache(num_pages=2, page_size=8192, enable_stats=True)
    c["a"] = 1
    c["b"] = "two"
    assert c.get_statistics() == (0, 0)
    for _ in range(3):
        assert c.get("a") == 1
    assert c.get("missing") is None
    assert c.get("missing", 5) == 5
    assert c["b"] == "two"
    with pytest.raises(KeyError):
        c["missing"]
    assert "a" in c and "missing" not in c
    assert c.get_statistics() == (7, 4)

    def child():
        return [c.get("a") for _ in range(10)] + [c.get("nope")]

    assert forked(child) == [1] * 10 + [None]
    assert c.get_statistics(clear=True) == (18, 14)
    assert c.get_statistics() == (0, 0)


@pytest.mark.multiprocess
def test_expired_entries_read_as_missing(cache, forked):
    """get, [] and `in` of an expired entry: missing, here (a frozen clock)
    and in another process (real time)."""
    c = cache(num_pages=2, page_size=8192)
    c._set_time_override(T0)
    c.set("e", "expiring", expire_time=10)
    c.set("f", "forever")
    c.set("g", "later", expire_on=time.time() + 3600)
    c._set_time_override(T0 + 9)
    assert c.get("e") == "expiring" and c["e"] == "expiring" and "e" in c
    c._set_time_override(T0 + 10)
    assert c.get("e") is None
    assert c.get("e", "dflt") == "dflt"
    with pytest.raises(KeyError):
        c["e"]
    assert "e" not in c
    assert c.get("f") == "forever" and "f" in c

    def child():
        # real time, far past T0 + 10, from a mapping of its own
        other = fastmmap.Cache(c.share_file)
        return other.get("e"), "e" in other, other.get("f"), other.get("g")

    assert forked(child) == (None, False, "forever", "later")
    c._set_time_override(0)
    assert c.get("e") is None and c.get("g") == "later"


@pytest.mark.parametrize("read", ["get", "getitem"])
def test_a_key_read_regularly_is_not_evicted(cache, read):
    """One page, a hot key read every 10 stores among 600 new keys: it is
    never evicted, while the cold keys go oldest first.  A key only tested
    with `in` (a peek, as it always was) is evicted like the cold ones."""
    c = cache(num_pages=1, page_size=8192)
    c.set("hot", b"h" * 100)
    c.set("peeked", b"p" * 100)
    cold = [f"cold{i:03d}" for i in range(600)]
    for i, k in enumerate(cold):
        assert c.set(k, b"c" * 100)
        if i % 10 == 9:
            assert (c.get("hot") if read == "get" else c["hot"]) == b"h" * 100, f"evicted after {i} stores"
            "peeked" in c  # noqa: B015
    keys = set(c.get_keys(0))
    assert "hot" in keys
    assert "peeked" not in keys
    assert "cold000" not in keys, "nothing was evicted: test too weak"
    left = [k for k in cold if k in keys]
    assert left == cold[len(cold) - len(left):] and len(left) > 20


# ---------------------------------------------------------------- which reads take the lock


@pytest.mark.multiprocess
def test_which_reads_take_the_page_lock(cache, forked, headers):
    """fmm_get_optimistic's fallbacks, seen in the sequence word: a read that
    took the lock moves it by 2, a lock-free one leaves it alone."""
    c = cache(num_pages=1, page_size=8192)
    h = headers(c)
    c._set_time_override(T0)

    def moves(fn):
        return seq_moves(h, 0, fn)

    assert moves(lambda: c.set("k", "v")) == 2
    # a hit with a fresh stamp, a miss, `in`: no lock
    assert moves(lambda: c.get("k")) == 0
    assert moves(lambda: c["k"]) == 0
    assert moves(lambda: "k" in c) == 0
    assert moves(lambda: c.get("missing")) == 0
    assert moves(lambda: "missing" in c) == 0
    # a new second: the stamp is stale, the first get restamps under the lock
    c._set_time_override(T0 + 1)
    assert moves(lambda: "k" in c) == 0  # a peek needs no stamp
    assert moves(lambda: c.get("k")) == 2
    assert moves(lambda: c.get("k")) == 0
    # many stores since its stamp: stale again
    for i in range(40):
        c.set(f"other{i}", "x" * 50)
    assert moves(lambda: c["k"]) == 2
    assert moves(lambda: c["k"]) == 0
    # an entry with a modseq: always the locked path
    c.set("m", "with modseq", modseq=5)
    assert moves(lambda: c.get("m")) == 2
    assert moves(lambda: c.get("m")) == 2
    assert moves(lambda: "m" in c) == 2
    assert c.get("m") == "with modseq" and c["m"] == "with modseq"
    c.remove("m", modseq=6)  # a tombstone: reads as absent
    assert moves(lambda: c.get("m")) == 2 and c.get("m") is None
    assert moves(lambda: "m" in c) == 2 and "m" not in c
    # an expired entry is a lock-free miss
    c.set("e", "expiring", expire_time=1)
    c._set_time_override(T0 + 5)
    assert moves(lambda: c.get("e")) == 0 and c.get("e") is None
    # a thread holding any page lock reads through the lock
    c._set_time_override(T0 + 6)
    assert c.get("k") == "v"
    assert moves(lambda: c.get("k")) == 0
    c2 = cache(num_pages=1, page_size=8192)
    with c2.lock("x"):
        assert moves(lambda: c.get("k")) == 2
        assert moves(lambda: "k" in c) == 2
    # lock-free reads from another process write nothing to the page
    before = h.page_bytes(0)
    got = forked(lambda: [c.get("k") for _ in range(1000)] + ["k" in c, c.get("nope")])
    assert got == ["v"] * 1000 + [True, None]
    assert h.page_bytes(0) == before, "lock-free reads changed the page"


def test_stats_and_read_cb_reads_take_the_page_lock(cache, headers):
    """enable_stats: every get takes the lock (it counts in the page).
    read_cb: a miss takes it (read-through), a hit does not."""
    stats = cache(num_pages=1, page_size=8192, enable_stats=True)
    hs = headers(stats)
    stats["k"] = 1
    assert seq_moves(hs, 0, lambda: stats.get("k")) == 2
    assert seq_moves(hs, 0, lambda: stats.get("k")) == 2
    assert seq_moves(hs, 0, lambda: stats.get("missing")) == 2

    rc = cache(num_pages=1, page_size=8192, read_cb=lambda ctx, key: f"loaded:{key}")
    rc._set_time_override(T0)  # no new second between the store and the hit
    hr = headers(rc)
    assert seq_moves(hr, 0, lambda: rc.get("a")) == 2  # the miss: read-through under the lock
    assert seq_moves(hr, 0, lambda: rc.get("a")) == 0  # now a hit
    assert seq_moves(hr, 0, lambda: "b" in rc) == 0  # `in` never reads through


# ---------------------------------------------------------------- 4. LRU restamping across processes


def _hot_reader(path, r_cmd, w_ans, frozen):
    """Answer each command byte with 3 gets of "hot" (b'1' if all returned its value)."""
    c = fastmmap.Cache(path)
    if frozen:
        c._set_time_override(T0)
    reads = 0
    while True:
        cmd = read_exactly(r_cmd, 1)
        if cmd == b"q":
            return reads
        ok = all(c.get("hot") == b"H" * 100 for _ in range(3))
        reads += 3
        os.write(w_ans, b"1" if ok else b"0")


@pytest.mark.multiprocess
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen-clock", "real-clock"])
def test_reads_from_another_process_restamp_a_hot_key(cache, forked, headers, frozen):
    """Another process reads "hot" (3 gets) after every 20 stores of new keys
    into a full one-page cache.  20 stores make its stamp stale, so the first
    of the 3 gets restamps it under the lock (the sequence word moves by 2)
    and the others are lock-free; "hot" is never evicted, though about 20
    times the page's size goes through it."""
    path = cache.path()
    c = cache(path, num_pages=1, page_size=8192)
    h = headers(c)
    if frozen:
        c._set_time_override(T0)  # only the clock rule acts
    n = 0
    while c._page_info(0)["live"] < 40:  # nearly fill the page
        c.set(f"fill{n}", b"f" * 100)
        n += 1
    c.set("hot", b"H" * 100)
    rounds, per_round = 60, 20
    moved = []
    with pipe_pair() as (r_cmd, w_cmd), pipe_pair() as (r_ans, w_ans):
        proc = forked.start(_hot_reader, path, r_cmd, w_ans, frozen)
        for rnd in range(rounds):
            for i in range(per_round):
                assert c.set(f"cold{rnd}-{i}", b"c" * 100)
            before = h.seq(0)
            os.write(w_cmd, b"r")
            ans = read_exactly(r_ans, 1)
            moved.append(h.seq(0) - before)
            assert ans == b"1", f"hot was evicted in round {rnd}; seq moves so far {moved}"
        os.write(w_cmd, b"q")
        assert proc.result(30) == 3 * rounds
    keys = set(c.get_keys(0))
    assert "hot" in keys
    assert "fill0" not in keys and "cold0-0" not in keys, "nothing was evicted: test too weak"
    if frozen:
        assert moved == [2] * rounds, f"expected one restamp per round: {moved}"
    else:  # a new second may add a restamp
        assert all(m in (2, 4) for m in moved), moved



def _fork_in_block(enter, in_block, after_block):
    """Fork inside a held lock.  The child runs in_block() inside the block,
    leaves the block (the context manager's __exit__, as the ``with``
    statement does), runs after_block() and reports each step's outcome
    ("ok", a result, or the exception's class name) through a pipe; it
    always ends with os._exit.  The parent leaves the block only after the
    child has exited.  Returns the report, e.g. "Error,left,waited"."""
    r, w = os.pipe()
    cm = enter()
    with cm:
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                os.close(r)
                res = [_child_step(in_block)]
                left = _child_step(lambda: [cm.__exit__(None, None, None)] and None)
                res.append("left" if left == "ok" else left)
                res.append(_child_step(after_block))
                os.write(w, ",".join(res).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        report = b""
        while True:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            report += chunk
        os.close(r)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status}"
    return report.decode()


def _child_step(fn) -> str:
    try:
        out = fn()
        return "ok" if out is None else str(out)
    except Exception as e:
        return type(e).__name__


@pytest.mark.multiprocess
@pytest.mark.parametrize("fmt", ["native", "perl"])
def test_a_child_forked_in_a_lock_block_holds_nothing(cache, fmt):
    """The page lock stays with the parent: in the child the block's writes
    fail, leaving the block releases nothing, and a read of that page waits
    for the parent (it must not take the parent's unfinished writes for
    settled ones).  On a Perl-format file the child's unlock must not
    release the parent's fcntl lock through the descriptor they share."""
    if fmt == "perl":
        c = cache(format="perl", serializer="raw", cache_size="64k", num_pages=2, lock_timeout=0.3)
    else:
        c = cache(num_pages=2, page_size=8192, lock_timeout=0.3)
    c["k"] = "v0"
    block = c.lock("k")

    def write():
        block.value = "from the child"

    def read():
        try:
            return "read " + str(c.get("k"))
        except fastmmap.LockTimeout:
            return "waited"

    report = _fork_in_block(lambda: block, write, read)
    assert report == "Error,left,waited", report
    assert c["k"] == "v0"
    with c.lock("k") as e:  # the parent released it normally
        e.value = "v1"
    assert c["k"] == "v1"


@pytest.mark.multiprocess
def test_a_child_forked_while_a_share_is_locked_holds_nothing():
    """Leaving a Share lock inherited across fork does nothing in the child;
    the parent still holds the lock and releases it normally."""
    s = fastmmap.Share(4096)
    s.set("v0")
    report = _fork_in_block(lambda: s, lambda: s._held(), lambda: s._held())
    assert report == "False,left,False", report
    assert not s._held()
    with s:
        s.set("v1")
    assert s.get() == "v1"
