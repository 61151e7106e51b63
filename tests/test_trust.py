"""Whose files are trusted, and what dead creators leave behind.

An existing cache file (or a reused cache directory) is used only if it
belongs to this user or root and gives group and others no write permission
beyond ``permissions=``: anyone else who can write it could plant a pickle
that runs in every reader.  The other user is real: a second uid (nobody)
through setpriv, which needs root.

A creator that dies while building a new file leaves a temporary file of
the cache's full size; the next open (and ``fastmmap check``) removes it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

import pytest

import fastmmap
from fastmmap import _fastmmap

pytestmark = pytest.mark.timeout(120)

NOBODY = pwd.getpwnam("nobody")


def _nobody_runs_this_python() -> bool:
    # An interpreter under a directory only root may enter (pyenv's in
    # /root, whose python finds libpython through its RUNPATH there) cannot
    # be started as nobody: the tests would fail on the loader, not on
    # fastmmap.
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return False
    probe = subprocess.run(
        ["setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}", "--clear-groups",
         sys.executable, "-c", "pass"],
        capture_output=True, timeout=60,
    )
    return probe.returncode == 0


needs_root = pytest.mark.skipif(
    not _nobody_runs_this_python(),
    reason="needs root (setpriv --reuid) and a Python that uid nobody can start",
)
SMALL = dict(num_pages=2, page_size="8k")


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run argv as uid and gid nobody, with no supplementary groups."""
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}", "--clear-groups", *argv],
        capture_output=True, text=True, timeout=60,
    )


def as_nobody_python(code: str, *args: str) -> str:
    proc = as_nobody(sys.executable, "-c", code, *args)
    if proc.returncode != 0 and as_nobody(sys.executable, "-c", "pass").returncode != 0:
        # e.g. make test-ft's interpreter, built under root's home (mode 700)
        pytest.skip(f"{sys.executable} cannot start as user nobody: its installation is not readable by them")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.fixture
def shared_dir():
    """A directory every user may create files in, sticky like /dev/shm and /tmp."""
    d = tempfile.mkdtemp(prefix="fastmmap-trust-")
    os.chmod(d, 0o1777)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def snapshot(path: str) -> tuple[bytes, int, int, int, int]:
    st = os.stat(path)
    with open(path, "rb") as f:
        return f.read(), st.st_mode, st.st_uid, st.st_ino, st.st_mtime_ns


PLANT = """
import sys, fastmmap
c = fastmmap.Cache(sys.argv[1], num_pages=2, page_size="8k", permissions=int(sys.argv[2], 8),
                   unlink_on_exit=False, **({"format": "perl", "serializer": "raw"} if sys.argv[3] == "perl" else {}))
c["config"] = b"planted" if sys.argv[3] == "perl" else {"planted": True}
c.close()
"""


# ---------------------------------------------------------------- files of another user


@needs_root
@pytest.mark.parametrize("fmt", ["native", "perl"])
@pytest.mark.parametrize("init_file", [False, True])
def test_a_cache_planted_by_another_user_is_refused_and_left_alone(shared_dir, fmt, init_file):
    path = os.path.join(shared_dir, "app.cache")
    as_nobody_python(PLANT, path, "666", fmt)
    before = snapshot(path)
    assert before[2] == NOBODY.pw_uid
    extra = {"format": "perl", "serializer": "raw"} if fmt == "perl" else {}
    # whatever permissions we would accept: the owner is the problem
    for perms in (0o600, 0o666):
        with pytest.raises(fastmmap.UntrustedFileError) as ei:
            fastmmap.Cache(path, permissions=perms, init_file=init_file, **SMALL, **extra)
        e = ei.value
        assert f"user nobody (uid {NOBODY.pw_uid})" in str(e) and "mode 0666" in str(e), str(e)
        assert (e.errno, e.filename) == (errno.EACCES, path)
        assert isinstance(e, fastmmap.Error) and isinstance(e, PermissionError)
    assert snapshot(path) == before, "the planted file was changed"
    assert os.listdir(shared_dir) == ["app.cache"]


@needs_root
def test_a_root_file_is_trusted_by_another_user_within_its_permissions(shared_dir):
    """Root may make a cache for service users; the mode rule still holds."""
    path = os.path.join(shared_dir, "shared.cache")
    with fastmmap.Cache(path, permissions=0o666, unlink_on_exit=False, **SMALL) as c:
        c["k"] = b"from root"
    code = """
import sys, fastmmap
try:
    c = fastmmap.Cache(sys.argv[1], permissions=int(sys.argv[2], 8))
except fastmmap.UntrustedFileError as e:
    print("refused:", e)
else:
    print("opened:", c["k"].decode())
"""
    assert as_nobody_python(code, path, "666") == "opened: from root"
    refused = as_nobody_python(code, path, "600")
    assert refused.startswith("refused:") and "user root (uid 0)" in refused and "mode 0666" in refused, refused
    assert "group and others" in refused


@pytest.mark.parametrize("fmt", ["native", "perl"])
@pytest.mark.parametrize("mode, who", [(0o660, "the group"), (0o602, "others"), (0o666, "group and others")])
def test_an_own_file_writable_beyond_permissions_is_refused(tmp_path, fmt, mode, who):
    path = str(tmp_path / "c.cache")
    extra = {"format": "perl", "serializer": "raw"} if fmt == "perl" else {}
    fastmmap.Cache(path, unlink_on_exit=False, **SMALL, **extra).close()
    os.chmod(path, mode)
    before = snapshot(path)
    with pytest.raises(fastmmap.UntrustedFileError, match=f"mode 0{mode:o}: it lets {who} write to it, "
                       r"beyond permissions=0o600; chmod it, or pass permissions=0o" + f"{mode:o}"):
        fastmmap.Cache(path, **extra, **SMALL)
    assert snapshot(path) == before
    # asked for (as the creator did): trusted
    fastmmap.Cache(path, permissions=mode, **extra, **SMALL).close()
    # read permission for others is not write permission
    os.chmod(path, 0o644)
    fastmmap.Cache(path, **extra, **SMALL).close()


# ---------------------------------------------------------------- directories


@pytest.fixture
def factory():
    pytest.importorskip("cachelib")
    from fastmmap.contrib.cachelib import FastMmapCache

    return lambda cache_dir, **kw: FastMmapCache.factory(None, {"CACHE_DIR": cache_dir}, [], kw)


@needs_root
def test_a_cache_dir_made_by_another_user_is_refused(shared_dir, factory):
    cache_dir = os.path.join(shared_dir, "myapp")
    proc = as_nobody("mkdir", "-m", "0700", cache_dir)
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(fastmmap.UntrustedFileError, match="refusing a directory owned by user nobody"):
        factory(cache_dir)
    assert os.listdir(cache_dir) == []


def test_a_cache_dir_writable_by_others_is_refused_unless_asked(tmp_path, factory):
    cache_dir = str(tmp_path / "myapp")
    os.mkdir(cache_dir)
    os.chmod(cache_dir, 0o777)
    with pytest.raises(fastmmap.UntrustedFileError, match="mode 0777: it lets group and others write"):
        factory(cache_dir)
    assert os.listdir(cache_dir) == []
    backend = factory(cache_dir, permissions=0o666)
    assert backend.set("k", 1) and backend.get("k") == 1
    backend.fastmmap_cache.close()
    os.unlink(os.path.join(cache_dir, "fastmmap.cache"))
    os.chmod(cache_dir, 0o700)
    backend = factory(cache_dir)
    assert backend.set("k", 2) and backend.get("k") == 2
    backend.fastmmap_cache.close()


def test_the_default_private_directory_passes_the_check():
    c = fastmmap.Cache(**SMALL)
    d = os.path.dirname(c.share_file)
    st = os.stat(d)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o700)
    fastmmap._check_dir(d)
    c.close()


# ---------------------------------------------------------------- abandoned temporary files


def _die_while_creating(path: str, options: dict) -> None:
    """Fork a creator that dies of a signal in the middle of creating the
    file: RLIMIT_FSIZE makes reserving its space raise SIGXFSZ, whose
    default action kills at once (no cleanup code runs, as with SIGKILL)."""
    pid = os.fork()
    if pid == 0:
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
            fastmmap.Cache(path, **options)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGXFSZ, status


def _temps(directory: str, name: str) -> list[str]:
    return sorted(f for f in os.listdir(directory) if f.startswith(name + ".tmp"))


@pytest.mark.parametrize("fmt", ["native", "perl"])
def test_the_next_open_removes_the_temporary_file_of_a_dead_creator(tmp_path, fmt):
    path = str(tmp_path / "c.cache")
    extra = {"format": "perl", "serializer": "raw"} if fmt == "perl" else {}
    for _ in range(3):
        _die_while_creating(path, {**SMALL, **extra})
    # each creator removed its dead predecessor's file before dying
    left = _temps(str(tmp_path), "c.cache")
    assert len(left) == 1 and left[0].startswith("c.cache.tmp-"), os.listdir(tmp_path)
    with fastmmap.Cache(path, **SMALL, **extra) as c:
        c["k"] = b"v"
        assert os.listdir(tmp_path) == ["c.cache"]


def test_fastmmap_check_reports_and_removes_them(tmp_path):
    path = str(tmp_path / "c.cache")
    fastmmap.Cache(path, unlink_on_exit=False, **SMALL).close()
    # a creator replacing it (other sizes, init_file) dies half way
    _die_while_creating(path, dict(num_pages=3, page_size="8k", init_file=True))
    (left,) = _temps(str(tmp_path), "c.cache")
    r = subprocess.run([sys.executable, "-m", "fastmmap", "check", path], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"removed {left} (0 B): a temporary file whose creator died" in r.stdout, r.stdout
    assert os.listdir(tmp_path) == ["c.cache"]


def test_only_unlocked_own_temporary_files_of_the_cache_are_removed(tmp_path):
    """The creator's flock, not its pid, tells a live creator: a pid is
    reused (here: a name with our own, living pid, but no lock is gone)."""
    d = str(tmp_path)
    path = os.path.join(d, "c.cache")

    def make(name: str) -> int:
        fd = os.open(os.path.join(d, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"x" * 100)
        return fd

    os.close(make(f"c.cache.tmp-{os.getpid()}-abc123"))  # pid alive, lock free: abandoned
    live = make("c.cache.tmp-1-Live00")
    fcntl.flock(live, fcntl.LOCK_EX)  # a creator at work
    os.close(make("c.cache.tmp-1-abc"))  # not a name the engine makes
    os.close(make("other.cache.tmp-1-abc123"))  # another cache's
    if os.geteuid() == 0:
        os.close(make("c.cache.tmp-2-nobody"))
        os.chown(os.path.join(d, "c.cache.tmp-2-nobody"), NOBODY.pw_uid, NOBODY.pw_gid)
    found = _fastmmap._reap_temps(path, False)
    assert found == [(f"c.cache.tmp-{os.getpid()}-abc123", 100)]
    assert f"c.cache.tmp-{os.getpid()}-abc123" in os.listdir(d), "remove=False removed it"
    fastmmap.Cache(path, **SMALL).close()
    kept = sorted(os.listdir(d))
    assert f"c.cache.tmp-{os.getpid()}-abc123" not in kept
    assert {"c.cache.tmp-1-Live00", "c.cache.tmp-1-abc", "other.cache.tmp-1-abc123"} <= set(kept), kept
    if os.geteuid() == 0:
        assert "c.cache.tmp-2-nobody" in kept
    os.close(live)
    fastmmap.Cache(path, **SMALL).close()
    assert "c.cache.tmp-1-Live00" not in os.listdir(d), "its creator is gone now"


# ---------------------------------------------------------------- small items


def test_an_empty_path_says_so():
    with pytest.raises(FileNotFoundError, match="the path of the cache file is empty"):
        fastmmap.Cache("")


def test_a_short_perl_file_that_nobody_is_writing_fails_without_waiting(tmp_path):
    """A file shorter than asked for is waited for only while it changes (a
    Perl creator appending pages); an old one fails at once.  Waiting is a
    series of short sleeps, each a voluntary context switch of this thread."""
    path = tmp_path / "short.pl"
    path.write_bytes(bytes(8192))
    old = time.time() - 3600
    os.utime(path, (old, old))
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
    with pytest.raises(fastmmap.GeometryError, match="the file is 8192 bytes"):
        fastmmap.Cache(str(path), format="perl", serializer="raw", num_pages=3, page_size="8k")
    slept = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw - before
    assert slept < 50, f"{slept} voluntary context switches: it waited"
    assert path.read_bytes() == bytes(8192)
