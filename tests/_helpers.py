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
