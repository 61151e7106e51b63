"""Helpers shared by test modules (imported as ``from _helpers import ...``;
pytest puts this directory on sys.path)."""

from __future__ import annotations

import threading
import time
from typing import Callable


def run_threads(target: Callable[[int], object], n: int, *, timeout: float = 60.0) -> None:
    """Run target(i) in n threads started together; re-raise the first error; fail on a hang.

    Raises AssertionError (not pytest.fail) on a hang, so that it also works
    inside forked children.
    """
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def wrapper(i: int) -> None:
        try:
            start.wait(timeout)
            target(i)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=wrapper, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    if alive:
        raise AssertionError(f"threads {alive} still running after {timeout}s: possible deadlock")
    if errors:
        raise errors[0]


# A waiter sets this bit in a page's lock word (glibc's robust-mutex
# protocol, which the engine's own wait follows) before it sleeps; only the
# holder's unlock clears it.
FUTEX_WAITERS = 0x80000000
FILE_HEADER_SIZE = 4096  # pages follow the file header; the lock word opens each


def wait_for_a_sleeper(path: str, page: int, page_size: int, timeout: float = 60.0) -> bool:
    """True once some thread sleeps on the lock of `page` of the cache file
    at `path` (a fastmmap-format file); False after `timeout` seconds."""
    import os
    import struct

    fd = os.open(path, os.O_RDONLY)
    try:
        deadline = time.monotonic() + timeout
        while True:
            (word,) = struct.unpack("<I", os.pread(fd, 4, FILE_HEADER_SIZE + page * page_size))
            if word & FUTEX_WAITERS:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)  # polling the lock word, not waiting for a time
    finally:
        os.close(fd)
