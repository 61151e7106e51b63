"""Shared fixtures for the fastmmap test suite.

- ``cache``: a factory that opens caches under ``tmp_path`` and always closes
  them (and so unlinks the files it created) at teardown.
- ``rand``: a seeded ``random.Random`` whose ``repr`` shows the seed, so a
  failing example can be replayed with ``FASTMMAP_TEST_SEED=<seed>``.
- ``forked``: run a function in a forked child with a timeout; a hang fails
  the test as a "possible deadlock" instead of hanging the suite.
"""

from __future__ import annotations

import os
import pickle
import random
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest

import fastmmap

# Wall-clock limit for any single child process or thread started by a test.
CHILD_TIMEOUT = 30.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a test that takes more than about a second")
    config.addinivalue_line("markers", "multiprocess: the test forks or spawns processes")
    # Registered here too so the suite still collects without pytest-timeout.
    config.addinivalue_line("markers", "timeout(seconds): per-test time limit (pytest-timeout)")


def pytest_report_header(config: pytest.Config) -> list[str]:
    gil = getattr(sys, "_is_gil_enabled", None)
    gil_state = "enabled" if gil is None or gil() else "DISABLED (free-threaded)"
    ext = getattr(fastmmap, "_fastmmap", None)
    where = getattr(ext, "__file__", "?")
    version = getattr(fastmmap, "__version__", "?")
    return [
        f"fastmmap {version}, extension {os.path.basename(where)}; GIL {gil_state}",
        f"FASTMMAP_TEST_SEED={os.environ.get('FASTMMAP_TEST_SEED', '(random)')}",
    ]


# ---------------------------------------------------------------- cache factory

_AUTO = object()


class CacheFactory:
    """``cache(**options)`` opens a fastmmap.Cache on a fresh file in tmp_path.

    Pass ``share_file=...`` to open a given path (or None for the library's own
    temporary file).  Every cache made here is closed at teardown.
    """

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self._n = 0
        self._made: list[fastmmap.Cache] = []

    def path(self, name: str | None = None) -> str:
        """A fresh path in tmp_path (the file does not exist yet)."""
        if name is None:
            self._n += 1
            name = f"cache-{self._n}.fmm"
        return str(self.tmp_path / name)

    def __call__(self, share_file: Any = _AUTO, **options: Any) -> fastmmap.Cache:
        if share_file is _AUTO:
            share_file = self.path()
        c = fastmmap.Cache(share_file, **options)
        self._made.append(c)
        return c

    def adopt(self, c: fastmmap.Cache) -> fastmmap.Cache:
        """Make the factory close a cache created some other way."""
        self._made.append(c)
        return c

    def close_all(self) -> None:
        while self._made:
            self._made.pop().close()


@pytest.fixture
def cache(tmp_path: Path):
    factory = CacheFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close_all()


# ---------------------------------------------------------------- seeded random


class SeededRandom(random.Random):
    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.initial_seed = seed

    def __repr__(self) -> str:
        return f"SeededRandom(seed={self.initial_seed})  # rerun with FASTMMAP_TEST_SEED={self.initial_seed}"

    def word(self, lo: int = 1, hi: int = 12) -> str:
        n = self.randint(lo, hi)
        return "".join(self.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(n))


@pytest.fixture
def rand() -> SeededRandom:
    env = os.environ.get("FASTMMAP_TEST_SEED")
    seed = int(env) if env else random.SystemRandom().randrange(2**32)
    r = SeededRandom(seed)
    print(repr(r))  # shown by pytest for a failing test
    return r


# ---------------------------------------------------------------- helpers


class ChildFailed(AssertionError):
    pass


class ForkedChild:
    """A forked child running fn(*args); ``result()`` collects its return value.

    The child leaves with os._exit, so no pytest or atexit code runs there.
    A child that does not finish in time is killed and the test fails with
    "possible deadlock".
    """

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            code = 0
            try:
                os.close(rfd)
                try:
                    payload = pickle.dumps(("ok", fn(*args)))
                except BaseException:
                    payload = pickle.dumps(("error", traceback.format_exc()))
                    code = 1
                view = memoryview(payload)
                while view:
                    view = view[os.write(wfd, view):]
                os.close(wfd)
            finally:
                os._exit(code)
        os.close(wfd)
        self.pid = pid
        self._rfd = rfd
        self._buf = bytearray()
        self.status: int | None = None

    def _drain(self) -> None:
        if self._rfd < 0:
            return
        os.set_blocking(self._rfd, False)
        while True:
            try:
                chunk = os.read(self._rfd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                return
            self._buf += chunk

    def wait(self, timeout: float = CHILD_TIMEOUT) -> int:
        """Wait for the child to exit; kill it and fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.status is None:
            self._drain()
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = status
                break
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"forked child {self.pid} did not finish in {timeout}s: possible deadlock")
            time.sleep(0.005)
        self._drain()
        return self.status

    def kill(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, self.status = os.waitpid(self.pid, 0)
        self._close()

    def _close(self) -> None:
        if self._rfd >= 0:
            os.close(self._rfd)
            self._rfd = -1

    def result(self, timeout: float = CHILD_TIMEOUT) -> Any:
        self.wait(timeout)
        self._close()
        if not self._buf:
            raise ChildFailed(f"child {self.pid} died without a result (wait status {self.status})")
        kind, value = pickle.loads(bytes(self._buf))
        if kind == "error":
            raise ChildFailed(f"child {self.pid} raised:\n{value}")
        return value


@pytest.fixture
def forked():
    """``forked(fn, *args, timeout=...)`` runs fn in a forked child and returns its result."""
    children: list[ForkedChild] = []

    def start(fn: Callable[..., Any], *args: Any) -> ForkedChild:
        child = ForkedChild(fn, *args)
        children.append(child)
        return child

    def run(fn: Callable[..., Any], *args: Any, timeout: float = CHILD_TIMEOUT) -> Any:
        return start(fn, *args).result(timeout)

    run.start = start  # type: ignore[attr-defined]
    yield run
    for child in children:  # never leave a child behind
        child.kill()
