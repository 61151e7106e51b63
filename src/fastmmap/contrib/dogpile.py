"""dogpile.cache backend storing a region's values in a fastmmap file.

Registered under the name ``"fastmmap"`` through dogpile.cache's plugin
entry point, so no import is needed::

    from dogpile.cache import make_region

    region = make_region().configure(
        "fastmmap",
        expiration_time=300,
        arguments={"filename": "/dev/shm/app.dogpile", "cache_size": "64m"},
    )

    @region.cache_on_arguments()
    def load_user(user_id): ...

Every process that opens the same file shares the region's values and its
dogpile lock: when a value is missing, one process (or thread) runs the
creator while the others wait for its result; when a value has expired, the
others keep getting the old one meanwhile.

The lock is a lease entry in the same file, taken with ``add()``, which is
atomic under the key's page lock: one caller in any process wins.  The page
lock itself is held only for that ``add()``, not while the creator runs:
holding it would stall every process reading any key of that page, and
dogpile needs one thread to hold several keys' locks at once and lets
``async_creation_runner`` release a lock from another thread, which a page
lock (a robust mutex, owned by its thread) allows neither of.  A waiter
polls the lease with a backoff (``lock_sleep`` at most); a lease whose
holder was killed expires after ``lock_timeout`` seconds.

Values are the bytes dogpile's serializer makes (pickle unless the region
sets ``serializer``/``deserializer``), so "Security and trust" in the
fastmmap manual applies to the file.
"""

from __future__ import annotations

import inspect
import math
import os
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dogpile.cache.api import NO_VALUE, BytesBackend, CacheMutex, KeyType, SerializedReturnType

import fastmmap

__all__ = ["FastMmapBackend", "FastMmapMutex"]

#: fastmmap.Cache options accepted among the backend arguments.
_CACHE_OPTIONS = frozenset(inspect.signature(fastmmap.Cache.__init__).parameters) - {
    "self",
    "share_file",
    "anonymous",
    "serializer",  # dogpile serializes: the backend stores its bytes as they are
}
_BACKEND_ARGUMENTS = frozenset({"filename", "lock_timeout", "lock_sleep", "lock_prefix"})

#: Lock entries live beside the values, under this prefix.
DEFAULT_LOCK_PREFIX = "fmm.dogpile-lock:"
#: Seconds after which a lock whose holder never released it expires.
DEFAULT_LOCK_TIMEOUT = 60
#: Longest pause between two looks at a held lock, in seconds.
DEFAULT_LOCK_SLEEP = 0.05
_FIRST_SLEEP = 0.001


class FastMmapMutex(CacheMutex):
    """dogpile's lock for one key, shared by every process on the file.

    ``acquire(False)`` answers at once; ``acquire()`` waits until the holder
    (in any process) releases it or its lease expires.  ``release()`` may
    run in another thread than ``acquire()`` (dogpile's
    ``async_creation_runner`` does that), and removes the lease only if it
    is still this mutex's.
    """

    def __init__(self, cache: fastmmap.Cache, lock_key: str, timeout: int, sleep: float) -> None:
        self._cache = cache
        self._key = lock_key
        self._timeout = timeout
        self._sleep = sleep
        self._token: str | None = None
        self._guard = threading.Lock()  # this object's _token, between threads

    def acquire(self, wait: bool = True) -> bool:
        token = uuid.uuid4().hex
        delay = _FIRST_SLEEP
        while True:
            with self._guard:
                if self._token is None and self._cache.add(self._key, token, expire_time=self._timeout):
                    self._token = token
                    return True
            if not wait:
                return False
            time.sleep(delay)
            delay = min(delay * 2, self._sleep)

    def release(self) -> None:
        with self._guard:
            token, self._token = self._token, None
        if token is None:
            raise RuntimeError(f"release of the dogpile lock {self._key!r}, which this mutex does not hold")
        with self._cache.lock(self._key) as entry:
            if entry.value == token:  # not if it expired and another caller took it
                entry.remove()

    def locked(self) -> bool:
        """Whether any caller, in any process, holds the lock."""
        return self._key in self._cache


class FastMmapBackend(BytesBackend):
    """A dogpile.cache backend in a fastmmap file: ``configure("fastmmap", ...)``.

    Arguments:

    - ``filename``: the cache file (required); every process names the same.
    - ``lock_timeout``: seconds after which an unreleased dogpile lock
      expires (default 60): a creator that runs longer may be run again by
      another process.
    - ``lock_sleep``: longest pause, in seconds, between two looks at a held
      lock (default 0.05).
    - ``lock_prefix``: prefix of the lock entries' keys.
    - any :class:`fastmmap.Cache` option but ``serializer`` (``cache_size``,
      ``page_size``, ``expire_time``, ``compressor``...).  ``unlink_on_exit``
      defaults to False: the file outlives the process that created it.

    A value too large for a page is not stored (and the key's old value is
    removed): the creator runs again on the next call.
    """

    def __init__(self, arguments: Mapping[str, Any]) -> None:
        arguments = dict(arguments)
        filename = arguments.pop("filename", None)
        if not filename:
            raise ValueError("the fastmmap dogpile backend needs arguments={'filename': path of the cache file}")
        unknown = set(arguments) - _CACHE_OPTIONS - _BACKEND_ARGUMENTS
        if unknown:
            raise TypeError(
                f"fastmmap dogpile backend: unknown argument(s) {', '.join(sorted(unknown))}; arguments are "
                f"{', '.join(sorted(_BACKEND_ARGUMENTS))} and the fastmmap.Cache options: "
                f"{', '.join(sorted(_CACHE_OPTIONS))}"
            )
        lock_timeout = arguments.pop("lock_timeout", DEFAULT_LOCK_TIMEOUT)
        if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, (int, float)) or not lock_timeout > 0:
            raise ValueError(f"lock_timeout must be a number of seconds > 0, got {lock_timeout!r}")
        lock_sleep = arguments.pop("lock_sleep", DEFAULT_LOCK_SLEEP)
        if isinstance(lock_sleep, bool) or not isinstance(lock_sleep, (int, float)) or not lock_sleep > 0:
            raise ValueError(f"lock_sleep must be a number of seconds > 0, got {lock_sleep!r}")
        self.lock_prefix: str = arguments.pop("lock_prefix", DEFAULT_LOCK_PREFIX)
        # whole seconds: the engine's expiry resolution; rounded up, so that
        # a lease lasts at least lock_timeout
        self.lock_timeout = int(math.ceil(lock_timeout))
        self.lock_sleep = float(lock_sleep)
        arguments.setdefault("unlink_on_exit", False)
        # values are dogpile's bytes: "raw" stores them as they are
        self.cache = fastmmap.Cache(os.fspath(filename), serializer="raw", **arguments)

    def get_mutex(self, key: KeyType) -> FastMmapMutex:
        return FastMmapMutex(self.cache, self.lock_prefix + str(key), self.lock_timeout, self.lock_sleep)

    def get_serialized(self, key: KeyType) -> SerializedReturnType:
        value: SerializedReturnType = self.cache.get(key, NO_VALUE)
        return value

    def get_serialized_multi(self, keys: Iterable[KeyType]) -> Sequence[SerializedReturnType]:
        cache = self.cache
        return [cache.get(key, NO_VALUE) for key in keys]

    def set_serialized(self, key: KeyType, value: bytes) -> None:
        if not self.cache.set(key, value):
            self.cache.remove(key)  # too big for a page: do not leave the old value

    def set_serialized_multi(self, mapping: Mapping[KeyType, bytes]) -> None:
        for key, value in mapping.items():
            self.set_serialized(key, value)

    def delete(self, key: KeyType) -> None:
        self.cache.remove(key)

    def delete_multi(self, keys: Iterable[KeyType]) -> None:
        for key in keys:
            self.cache.remove(key)
