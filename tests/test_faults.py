"""Faults from the outside world: no space, files deleted, replaced, read-only,
symlinked, corrupt headers, lock holders that never let go, Ctrl-C.

Anything that could crash the process (a SIGBUS from a mapping without
backing store, a huge mapping) runs in a forked child, so that a crash fails
one test instead of killing the test run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

import pytest

import fastmmap
from _helpers import wait_for_a_sleeper
from fastmmap import _fastmmap

pytestmark = pytest.mark.timeout(120)

HEADER_SIZE = 4096
# File header fields (fmm.c, struct file_header): offset and struct format.
H_VERSION = (8, "I")
H_STATE = (12, "I")
H_PAGE_SIZE = (20, "I")
H_NUM_PAGES = (24, "I")
H_START_SLOTS = (28, "I")
H_FILE_SIZE = (32, "Q")
H_CHECK = (56, "Q")  # xxh64 of bytes 0..55

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
MNT_DETACH = 2


def _mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> int:
    """mount(2); return 0 or the errno."""
    rc = _libc.mount(
        source.encode(), target.encode(), fstype.encode() if fstype else None, ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    return ctypes.get_errno() if rc != 0 else 0


def _umount(target: str) -> None:
    _libc.umount2(target.encode(), MNT_DETACH)


MS_RDONLY, MS_REMOUNT, MS_BIND = 1, 32, 4096


def _left_in(directory) -> list[str]:
    return sorted(os.listdir(directory))


def _open_error(path, **options):
    """Open a cache (in a forked child: a crash there cannot kill the run);
    return (exception class name, errno, filename, message) or None."""
    try:
        c = fastmmap.Cache(path, **options)
    except Exception as e:  # noqa: BLE001 - reported to the test
        return type(e).__name__, getattr(e, "errno", None), getattr(e, "filename", None), str(e)
    c.close()
    return None


def _fails(forked, path, **options):
    """_open_error in a forked child; the open must fail."""
    result = forked(lambda: _open_error(path, **options))
    assert result is not None, f"opening {path} with {options} succeeded"
    return result


# ---------------------------------------------------------------- no space


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs; skipped only where mounting is not permitted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    rc = _mount("tmpfs", str(mnt), "tmpfs", 0, "size=1m")
    if rc == errno.EPERM:
        pytest.skip(f"mounting a tmpfs is not permitted here ({os.strerror(rc)}): "
                    "test_file_size_limit_fails_at_open covers the failure path")
    assert rc == 0, f"mount tmpfs: {os.strerror(rc)}"
    try:
        yield str(mnt)
    finally:
        _umount(str(mnt))


def test_cache_larger_than_the_free_space_fails_at_open(small_tmpfs, forked):
    """ENOSPC is reported by the constructor (space is reserved at creation),
    never later as a SIGBUS, and no temporary file is left behind."""
    path = os.path.join(small_tmpfs, "big.fmm")
    name, err, filename, msg = _fails(forked, path, cache_size="4m")
    assert (name, err) == ("OSError", errno.ENOSPC), msg
    assert filename == path
    assert _left_in(small_tmpfs) == []


def test_a_cache_that_fits_is_usable_to_its_last_byte_on_a_nearly_full_fs(small_tmpfs, forked):
    path = os.path.join(small_tmpfs, "fits.fmm")

    def fill():
        c = fastmmap.Cache(path, page_size=8192, num_pages=64, unlink_on_exit=False)  # 516 KiB
        n = 0
        for i in range(2000):  # writes into every page, evicting all the way
            n += c.set(f"k{i}", os.urandom(3000))
        return n, c.check()

    stored, problems = forked(fill)
    assert stored == 2000 and problems == []
    # Not enough space left for a second one: an error now, no SIGBUS later.
    name, err, filename, msg = _fails(forked, os.path.join(small_tmpfs, "second.fmm"), cache_size="768k")
    assert (name, err, filename) == ("OSError", errno.ENOSPC, os.path.join(small_tmpfs, "second.fmm")), msg
    assert _left_in(small_tmpfs) == ["fits.fmm"]
    # The first one is still fine.
    assert forked(lambda: fastmmap.Cache(path).check()) == []


def test_file_size_limit_fails_at_open(tmp_path, forked):
    """RLIMIT_FSIZE makes reserving the space fail (EFBIG): an OSError naming
    the file at open, and nothing left behind.  Works without privileges."""
    path = str(tmp_path / "limited.fmm")

    def child():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        return _open_error(path, cache_size="1m")

    name, err, filename, msg = forked(child)
    assert (name, err) == ("OSError", errno.EFBIG), msg
    assert filename == path
    assert _left_in(tmp_path) == []


# ---------------------------------------------------------------- the file changes underneath


def test_file_deleted_underneath_is_reported_and_the_mapping_keeps_working(cache, forked):
    path = cache.path()
    c = cache(path, num_pages=3, page_size=8192)
    c["before"] = 1
    assert c.check() == []
    os.unlink(path)
    problems = c.check()
    assert len(problems) == 1 and "file" in problems[0].lower(), problems
    # The open cache still works on the old mapping, here and in a child.
    c["after"] = 2
    assert (c["before"], c["after"]) == (1, 2)
    assert forked(lambda: (c["before"], c.get_and_set("after", lambda k, v: v + 1))) == (1, 3)
    assert c["after"] == 3
    # A new open at the path makes a new, empty cache.
    fresh = cache(path)
    assert "before" not in fresh and fresh.check() == []
    assert len(c.check()) == 1


@pytest.mark.parametrize("how", ["init_file with other sizes", "rename over it", "delete and recreate"])
def test_file_replaced_underneath_is_reported(cache, how):
    path = cache.path()
    c = cache(path, num_pages=3, page_size=8192)
    c["old"] = "old"
    if how == "init_file with other sizes":
        new = cache(path, init_file=True, num_pages=5, page_size=4096, unlink_on_exit=False)
    elif how == "rename over it":
        other = cache.path()
        cache(other, num_pages=3, page_size=8192, unlink_on_exit=False)["new"] = "new"
        os.replace(other, path)
        new = cache(path)
    else:
        os.unlink(path)
        new = cache(path, num_pages=3, page_size=8192, unlink_on_exit=False)
    problems = c.check()
    assert len(problems) == 1 and "file" in problems[0].lower() and "replaced" in problems[0], problems
    assert new.check() == []
    # Each handle keeps its own file.
    c["x"] = "mine"
    assert c["old"] == "old" and "old" not in new and "x" not in new


def test_init_file_with_the_same_geometry_keeps_the_file(cache):
    path = cache.path()
    c = cache(path, num_pages=3, page_size=8192)
    c["old"] = 1
    cache(path, init_file=True, num_pages=3, page_size=8192)
    assert c.check() == []  # re-initialised in place: still the same file
    assert "old" not in c


def test_closing_a_handle_does_not_unlink_the_file_that_replaced_its_own(cache):
    """unlink_on_exit removes the file this handle created, not whatever now
    has its name: another process's new cache must survive."""
    path = cache.path()
    c = cache(path, num_pages=3, page_size=8192)  # created here: unlink_on_exit
    new = fastmmap.Cache(path, init_file=True, num_pages=5, page_size=4096, unlink_on_exit=False)
    try:
        new["k"] = "new"
        assert len(c.check()) == 1
        c.close()
        assert os.path.exists(path), "close() unlinked another cache's file"
        assert new.check() == []
    finally:
        new.close()
        if os.path.exists(path):
            os.unlink(path)


# ---------------------------------------------------------------- read-only files and directories


def test_immutable_file_gives_permissionerror_naming_the_file(cache, forked):
    chattr = shutil.which("chattr")
    if not chattr:
        pytest.skip("chattr is not installed")
    path = cache.path()
    cache(path, num_pages=2, page_size=4096, unlink_on_exit=False)
    r = subprocess.run([chattr, "+i", path], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"chattr +i failed here: {r.stderr.strip()}")
    try:
        name, err, filename, msg = _fails(forked, path)
        assert (name, err, filename) == ("PermissionError", errno.EPERM, path), msg
        name, err, filename, msg = _fails(forked, path, init_file=True, num_pages=3, page_size=4096)
        assert name in ("PermissionError", "OSError") and filename == path, msg
    finally:
        subprocess.run([chattr, "-i", path], check=True)


def test_read_only_mount_gives_oserror_naming_the_file(cache, tmp_path, forked):
    src = tmp_path / "rw"
    ro = tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    cache(str(src / "c.fmm"), num_pages=2, page_size=4096)["k"] = 1
    rc = _mount(str(src), str(ro), None, MS_BIND)
    if rc == errno.EPERM:
        pytest.skip(f"bind mounts are not permitted here ({os.strerror(rc)})")
    assert rc == 0, os.strerror(rc)
    try:
        rc = _mount(str(src), str(ro), None, MS_BIND | MS_REMOUNT | MS_RDONLY)
        assert rc == 0, os.strerror(rc)
        name, err, filename, msg = _fails(forked, str(ro / "c.fmm"))
        assert (name, err, filename) == ("OSError", errno.EROFS, str(ro / "c.fmm")), msg
        name, err, filename, msg = _fails(forked, str(ro / "new.fmm"))
        assert (name, err, filename) == ("OSError", errno.EROFS, str(ro / "new.fmm")), msg
        assert _left_in(src) == ["c.fmm"]
    finally:
        _umount(str(ro))


@pytest.fixture
def world_dir():
    """A directory that an unprivileged user can reach (tmp_path's parents are 0700)."""
    d = tempfile.mkdtemp(prefix="fastmmap-perm-")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _as_nobody(fn, *args):
    """Run fn as uid/gid 65534 when we are root (permission bits don't stop root)."""
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    return fn(*args)


def test_unreadable_file_gives_permissionerror_naming_the_file(world_dir, forked):
    path = os.path.join(world_dir, "c.fmm")
    fastmmap.Cache(path, num_pages=2, page_size=4096, unlink_on_exit=False).close()
    os.chmod(path, 0o400)
    if os.geteuid() != 0:
        os.chmod(path, 0o000)  # we own it: take our own read and write bits away
    name, err, filename, msg = forked(_as_nobody, _open_error, path) or ("no error",) * 4
    assert (name, err, filename) == ("PermissionError", errno.EACCES, path), msg


def test_read_only_directory_gives_permissionerror_at_creation(world_dir, forked):
    d = os.path.join(world_dir, "ro")
    os.mkdir(d, 0o500)
    os.chmod(d, 0o555)
    path = os.path.join(d, "new.fmm")
    name, err, filename, msg = forked(_as_nobody, _open_error, path) or ("no error",) * 4
    assert (name, err, filename) == ("PermissionError", errno.EACCES, path), msg
    assert _left_in(d) == []


# ---------------------------------------------------------------- symlinks


@pytest.mark.parametrize("init_file", [False, True])
def test_symlink_to_a_file_is_refused_and_the_target_untouched(tmp_path, init_file):
    target = tmp_path / "precious.txt"
    target.write_bytes(b"do not touch\n" * 100)
    before = os.stat(target)
    link = tmp_path / "cache.fmm"
    link.symlink_to(target)
    with pytest.raises(OSError) as info:
        fastmmap.Cache(str(link), init_file=init_file, num_pages=2, page_size=4096)
    assert info.value.errno == errno.ELOOP and info.value.filename == str(link)
    after = os.stat(target)
    assert target.read_bytes() == b"do not touch\n" * 100
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert _left_in(tmp_path) == ["cache.fmm", "precious.txt"]


def test_dangling_symlink_is_refused_and_its_target_not_created(tmp_path):
    link = tmp_path / "cache.fmm"
    link.symlink_to(tmp_path / "elsewhere.fmm")
    with pytest.raises(OSError) as info:
        fastmmap.Cache(str(link))
    assert info.value.errno == errno.ELOOP and info.value.filename == str(link)
    assert _left_in(tmp_path) == ["cache.fmm"]


def test_symlink_to_a_cache_is_refused_and_the_cache_untouched(cache, tmp_path):
    real = cache.path("real.fmm")
    c = cache(real, num_pages=2, page_size=4096)
    c["k"] = "v"
    with open(real, "rb") as f:
        image = f.read()
    link = tmp_path / "link.fmm"
    link.symlink_to(real)
    for opts in ({}, {"init_file": True}):
        with pytest.raises(OSError) as info:
            fastmmap.Cache(str(link), **opts)
        assert info.value.errno == errno.ELOOP
    with open(real, "rb") as f:
        assert f.read() == image
    assert c.check() == [] and c["k"] == "v"


# ---------------------------------------------------------------- corrupt headers


def _make_file(path, **options) -> bytes:
    with fastmmap.Cache(path, unlink_on_exit=False, **options) as c:
        c["k"] = "v"
    with open(path, "rb") as f:
        return f.read()


def _patch(path, fields: dict, fix_check: bool) -> None:
    with open(path, "r+b") as f:
        head = bytearray(f.read(HEADER_SIZE))
        for (off, fmt), value in fields.items():
            struct.pack_into(fmt, head, off, value)
        if fix_check:
            struct.pack_into("Q", head, H_CHECK[0], _fastmmap.xxh64(bytes(head[: H_CHECK[0]])))
        f.seek(0)
        f.write(head)


BAD_HEADERS = {
    "page_size 3": {H_PAGE_SIZE: 3},
    "page_size 0": {H_PAGE_SIZE: 0},
    "page_size not a power of two": {H_PAGE_SIZE: 8192 + 4096},
    "page_size 2 GiB": {H_PAGE_SIZE: 2**31},
    "num_pages 2**31": {H_NUM_PAGES: 2**31},
    "num_pages 0": {H_NUM_PAGES: 0},
    "num_pages 2**24 with a matching file_size": {H_NUM_PAGES: 2**24, H_FILE_SIZE: HEADER_SIZE + 2**24 * 8192},
    "1 GiB pages with a matching file_size": {H_PAGE_SIZE: 2**30, H_FILE_SIZE: HEADER_SIZE + 4 * 2**30},
    "start_slots 0": {H_START_SLOTS: 0},
    "start_slots 2**30": {H_START_SLOTS: 2**30},
    "file_size off by a page": {H_FILE_SIZE: HEADER_SIZE + 5 * 8192},
    "version 1 (the old page layout)": {H_VERSION: 1},
    "version 2 (no sequence word: its writers would not move it)": {H_VERSION: 2},
    "version 3 (whole-second expiry, keys hashed to other pages)": {H_VERSION: 3},
    "version 5": {H_VERSION: 5},
    "state not ready": {H_STATE: 0},
}


@pytest.mark.parametrize("fix_check", [True, False], ids=["valid-checksum", "stale-checksum"])
@pytest.mark.parametrize("fields", list(BAD_HEADERS.values()), ids=list(BAD_HEADERS))
def test_header_with_impossible_fields_is_rejected_before_mapping(tmp_path, forked, fields, fix_check):
    path = str(tmp_path / "c.fmm")
    _make_file(path, page_size=8192, num_pages=4)
    _patch(path, fields, fix_check)
    with open(path, "rb") as f:
        image = f.read()
    start = time.monotonic()
    name, err, filename, msg = _fails(forked, path)  # in a child: a bad mapping would crash it, not us
    assert time.monotonic() - start < 20
    assert name == "BadFileError", msg
    assert path in msg
    with open(path, "rb") as f:
        assert f.read() == image, "a failed open changed the file"


def test_bad_header_with_init_file_is_replaced_by_a_fresh_cache(tmp_path):
    path = str(tmp_path / "c.fmm")
    _make_file(path, page_size=8192, num_pages=4)
    _patch(path, {H_NUM_PAGES: 2**31}, True)
    with fastmmap.Cache(path, init_file=True, page_size=8192, num_pages=4) as c:
        assert c.check() == [] and "k" not in c
        c["new"] = 1
        assert c["new"] == 1


def test_magic_overwritten_is_rejected(tmp_path):
    path = str(tmp_path / "c.fmm")
    _make_file(path, page_size=4096, num_pages=2)
    with open(path, "r+b") as f:
        f.write(b"NOTACACH")
    with pytest.raises(fastmmap.BadFileError, match="c.fmm"):
        fastmmap.Cache(path)


@pytest.mark.parametrize("new_size", ["half", "header only", "header minus one", "one page more", "one byte more"])
def test_file_of_the_wrong_size_is_rejected(tmp_path, forked, new_size):
    path = str(tmp_path / "c.fmm")
    image = _make_file(path, page_size=8192, num_pages=4)
    size = {
        "half": len(image) // 2,
        "header only": HEADER_SIZE,
        "header minus one": HEADER_SIZE - 1,
        "one page more": len(image) + 8192,
        "one byte more": len(image) + 1,
    }[new_size]
    os.truncate(path, size)
    name, err, filename, msg = _fails(forked, path)
    assert name == "BadFileError" and path in msg, msg
    assert os.path.getsize(path) == size


# ---------------------------------------------------------------- lock holders


def _hold_in_child(forked, path, key):
    """A child holds key's page (with cache.lock) until told to stop; returns
    (child, release function)."""
    to_parent_r, to_parent_w = os.pipe()
    to_child_r, to_child_w = os.pipe()

    def holder():
        c = fastmmap.Cache(path)
        with c.lock(key) as e:
            e.value = "held"
            os.write(to_parent_w, b"L")
            ready, _, _ = select.select([to_child_r], [], [], 60)  # "sleeps" holding the lock
            e.value = "released"
        return True

    child = forked.start(holder)
    ready, _, _ = select.select([to_parent_r], [], [], 30)
    assert ready, "the holder never took the lock"
    os.read(to_parent_r, 1)

    def release():
        os.write(to_child_w, b"x")
        try:
            assert child.result(30) is True
        finally:
            for fd in (to_parent_r, to_parent_w, to_child_r, to_child_w):
                os.close(fd)

    return child, release


def _locked_op(c, op, key):
    if op == "get":
        c.get(key)
    elif op == "set":
        c.set(key, "mine")
    elif op == "contains":
        key in c  # noqa: B015
    elif op == "delitem":
        del c[key]
    elif op == "get_and_set":
        c.get_and_set(key, lambda k, v: "mine")
    elif op == "remove":
        c.remove(key)
    elif op == "lock":
        with c.lock(key) as e:
            e.value = "mine"
    else:
        raise AssertionError(op)


LOCKED_OPS = ["get", "set", "contains", "delitem", "get_and_set", "remove", "lock"]


def test_lock_timeout_raises_when_another_process_holds_the_page(cache, forked):
    path = cache.path()
    c = cache(path, num_pages=8, page_size=8192, lock_timeout=0.2)
    key = "contended"
    _, release = _hold_in_child(forked, path, key)
    try:
        for op in LOCKED_OPS:
            start = time.monotonic()
            with pytest.raises(fastmmap.LockTimeout):
                _locked_op(c, op, key)
            waited = time.monotonic() - start
            # never early; the upper bound only catches a unit mix-up (the
            # holder never lets go, so without the timeout this would hang)
            assert 0.19 <= waited < 20, f"{op}: LockTimeout after {waited:.3f}s with lock_timeout=0.2"
        # Only that page is held: some other key (on another page) is served at once.
        served = []
        for i in range(40):
            try:
                c.set(f"other-{i}", i)
                served.append(i)
            except fastmmap.LockTimeout:
                pass
        assert served, "no other page was usable while one page was held"
    finally:
        release()
    assert c["contended"] == "released"
    _locked_op(c, "set", key)
    assert c[key] == "mine"
    assert isinstance(fastmmap.LockTimeout("x"), TimeoutError)


WAITER = r"""
import signal, sys, time
import fastmmap

signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises KeyboardInterrupt

path, key, op, timeout = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
c = fastmmap.Cache(path, lock_timeout=None if timeout == "none" else float(timeout))

def attempt():
    if op == "get":
        return c.get(key)
    if op == "set":
        return c.set(key, "waiter")
    if op == "get_and_set":
        return c.get_and_set(key, lambda k, v: "waiter")
    with c.lock(key) as e:
        e.value = "waiter"

start = time.monotonic()
try:
    print("waiting", flush=True)
    attempt()
    print("no interrupt: the operation completed", flush=True)
except KeyboardInterrupt:
    print(f"KeyboardInterrupt after {time.monotonic() - start:.3f}", flush=True)
except BaseException as e:
    print(f"unexpected {type(e).__name__}: {e}", flush=True)
    sys.exit(2)
# The interrupted wait left nothing behind: once the page is free, it works.
sys.stdin.readline()
attempt()
print("ok", c.get(key), flush=True)
"""


def _readline(proc, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"no output from the waiter in {timeout}s")
    return proc.stdout.readline().strip()


@pytest.mark.parametrize("timeout", ["none", "30"])
@pytest.mark.parametrize("op", ["get", "set", "get_and_set", "lock"])
def test_ctrl_c_interrupts_a_process_waiting_for_a_page_lock(cache, tmp_path, op, timeout):
    path = cache.path()
    c = cache(path, num_pages=1, page_size=8192)  # the key's page is page 0
    key = "contended"
    c[key] = "initial"
    proc = subprocess.Popen(
        [sys.executable, "-c", WAITER, path, key, op, timeout],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path),
    )
    try:
        with c.lock(key) as e:  # this process holds the page
            assert _readline(proc, 30) == "waiting"
            assert wait_for_a_sleeper(path, 0, 8192), "the waiter never blocked on the lock"
            proc.send_signal(signal.SIGINT)
            # well within the waiter's lock timeout (30 s, or none): the
            # signal ended the wait, not the timeout or our release
            line = _readline(proc, 20)
            assert line.startswith("KeyboardInterrupt after "), line + proc.stderr.read()
            e.value = "holder"
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert _readline(proc, 30) == ("ok holder" if op == "get" else "ok waiter")
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        proc.stdin.close()
    assert c[key] == ("holder" if op == "get" else "waiter")


def test_a_damaged_mutex_kind_word_is_restored_not_an_abort(cache, forked):
    """glibc aborts (an internal assertion) when a mutex's kind word claims
    priority-protect without robustness; the engine restores the word and
    re-initialises the page instead.  Page offset 16 is glibc's __kind."""
    path = cache.path()
    c = cache(path, num_pages=2, page_size=8192)
    for i in range(50):
        c[f"k{i}"] = i
    before = c.repaired_pages()
    with open(path, "r+b") as f:
        for page in range(2):
            f.seek(4096 + page * 8192 + 16)
            f.write((0x40).to_bytes(4, "little"))  # PTHREAD_MUTEX_PP_NORMAL_NP

    def child():
        with fastmmap.Cache(path, lock_timeout=5) as c2:
            c2["fresh"] = 1
            return c2["fresh"], len(c2), c2.check()

    fresh, _, problems = forked(child, timeout=30)
    assert fresh == 1 and problems == []
    assert c.repaired_pages() >= before + 1
    assert c["fresh"] == 1
