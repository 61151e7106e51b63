"""Django cache backend storing entries in a fastmmap file.

Every process that configures the same ``LOCATION`` shares one cache, with
no server in between::

    CACHES = {
        "default": {
            "BACKEND": "fastmmap.contrib.django.FastMmapCache",
            "LOCATION": "/dev/shm/site.cache",
            "TIMEOUT": 300,
            "OPTIONS": {"cache_size": "64m"},  # any fastmmap.Cache option
        }
    }

``OPTIONS`` are passed to :class:`fastmmap.Cache` (``MAX_ENTRIES`` and
``CULL_FREQUENCY`` are accepted and ignored: each page evicts its least
recently used entries when it fills up).  The file is opened on first use
in each process; a process forked after that keeps using the parent's
mapping.  Unlike a plain ``fastmmap.Cache``, the file is not removed when
the process that created it exits (``unlink_on_exit`` defaults to False),
since worker processes come and go.

``incr`` and ``decr`` are atomic across processes.  Values go through
fastmmap's serializer (pickle by default), so anyone who can write the file
can run code in the processes that read it: see "Security and trust" in the
fastmmap manual.
"""

from __future__ import annotations

import inspect
import os
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

# Django ships no type information (django-stubs is separate).
from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache  # type: ignore[import-untyped,unused-ignore]
from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped,unused-ignore]

import fastmmap

from . import _web

__all__ = ["FastMmapCache"]

#: fastmmap.Cache options this backend accepts in OPTIONS.
_CACHE_OPTIONS = frozenset(inspect.signature(fastmmap.Cache.__init__).parameters) - {"self", "share_file", "anonymous"}
#: Django's own OPTIONS for the local-memory and file backends: ignored here.
_IGNORED_OPTIONS = frozenset({"MAX_ENTRIES", "CULL_FREQUENCY"})
#: expire_on is stored as an unsigned 32-bit number of unix seconds.
_MAX_EXPIRE_ON = float(2**32 - 1)
#: _expire_on() result for a timeout <= 0: the entry must not be stored.
_EXPIRED = -1

_MISSING = object()


class _NotFound(Exception):
    """Raised inside get_and_set to abandon an incr of a missing key."""


# One fastmmap.Cache per (file, options) per process: Django creates a
# backend object per thread (and per alias), and they should all share one
# mapping.  A child forked after a cache was opened inherits it and keeps
# using it (fastmmap supports that), so the registry is kept across fork;
# only its lock is replaced, in case another thread held it at the fork.
_registry: dict[tuple[str, tuple[tuple[str, str], ...]], fastmmap.Cache] = {}
_registry_lock = threading.Lock()


def _reset_registry_lock() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_registry_lock)


def _open_shared(location: str, options: dict[str, Any]) -> fastmmap.Cache:
    key = (location, tuple(sorted((name, repr(value)) for name, value in options.items())))
    with _registry_lock:
        cache = _registry.get(key)
        if cache is None or cache.closed:
            cache = _registry[key] = _web.open_cache(location, options)
        return cache


class FastMmapCache(BaseCache):  # type: ignore[misc,unused-ignore]
    """A Django cache in a file shared by every process that opens it.

    ``LOCATION`` is the path of the cache file (required); ``OPTIONS`` are
    :class:`fastmmap.Cache` options.  Timeouts follow Django: the default
    is ``TIMEOUT`` (300 s), ``None`` never expires, and ``0`` or less
    expires at once (the key is removed).
    """

    def __init__(self, location: str, params: dict[str, Any]) -> None:
        super().__init__(params)
        if not location:
            raise ImproperlyConfigured(
                "FastMmapCache needs LOCATION: the path of the cache file, e.g. '/dev/shm/site.cache'"
            )
        options = {}
        for name, value in (params.get("OPTIONS") or {}).items():
            if name in _IGNORED_OPTIONS:
                continue
            if name not in _CACHE_OPTIONS:
                raise ImproperlyConfigured(
                    f"FastMmapCache: unknown OPTIONS key {name!r}; OPTIONS are fastmmap.Cache "
                    f"options: {', '.join(sorted(_CACHE_OPTIONS))}"
                )
            options[name] = value
        # Workers come and go: the first one to open the file must not
        # remove it when it exits (fastmmap's default for a file it created).
        options.setdefault("unlink_on_exit", False)
        self._location = os.path.abspath(os.fspath(location))
        self._options = options
        self._fmm: fastmmap.Cache | None = None

    # ----- the fastmmap.Cache -----

    @property
    def fastmmap_cache(self) -> fastmmap.Cache:
        """The underlying fastmmap.Cache, opened on first use in this process.

        Keys there are the full keys (see ``make_key``).
        """
        cache = self._fmm
        if cache is None or cache.closed:
            cache = self._fmm = _open_shared(self._location, self._options)
        return cache

    def _expire_on(self, timeout: Any) -> float:
        """Django timeout -> fastmmap expire_on (0 = never) or _EXPIRED."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        if timeout is None:
            return 0
        if timeout <= 0:
            return _EXPIRED
        # A float keeps its milliseconds (rounded up): an entry never expires early.
        return min(time.time() + float(timeout), _MAX_EXPIRE_ON)

    def _store(self, cache: fastmmap.Cache, key: str, value: Any, expire_on: float) -> bool:
        if expire_on == _EXPIRED:
            cache.remove(key)
            return True
        if cache.set(key, value, expire_on=expire_on):
            return True
        # The item can never fit in a page: do not leave the old value
        # behind to be read as the new one (memcached does the same).
        cache.remove(key)
        self._too_large(cache, key, value)
        return False

    def _too_large(self, cache: fastmmap.Cache, key: str, value: Any) -> None:
        """Warn (once per size class), or raise under settings.DEBUG."""
        from django.conf import settings  # type: ignore[import-untyped,unused-ignore]

        _web.report(cache, key, value, debug=bool(getattr(settings, "DEBUG", False)))

    # ----- BaseCache -----

    def add(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        cache = self.fastmmap_cache
        expire_on = self._expire_on(timeout)
        if expire_on == _EXPIRED:
            # Stored and expired at once: "added" only if the key was absent.
            return not cache.exists(key)
        try:
            return cache.add(key, value, expire_on=expire_on)
        except fastmmap.ItemTooLargeError:
            self._too_large(cache, key, value)
            return False

    def get(self, key: Any, default: Any = None, version: Any = None) -> Any:
        key = self.make_and_validate_key(key, version=version)
        return self.fastmmap_cache.get(key, default)

    def set(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None) -> None:
        key = self.make_and_validate_key(key, version=version)
        self._store(self.fastmmap_cache, key, value, self._expire_on(timeout))

    def touch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        cache = self.fastmmap_cache
        expire_on = self._expire_on(timeout)
        if expire_on == _EXPIRED:
            return cache.remove(key)
        return cache.touch(key, expire_on=expire_on)

    def delete(self, key: Any, version: Any = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        return self.fastmmap_cache.remove(key)

    def get_many(self, keys: Iterable[Any], version: Any = None) -> dict[Any, Any]:
        cache = self.fastmmap_cache
        found: dict[Any, Any] = {}
        for key in keys:
            value = cache.get(self.make_and_validate_key(key, version=version), _MISSING)
            if value is not _MISSING:
                found[key] = value
        return found

    def has_key(self, key: Any, version: Any = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        return self.fastmmap_cache.exists(key)

    def incr(self, key: Any, delta: Any = 1, version: Any = None) -> Any:
        """Add delta to the value, atomically across processes.

        ValueError if the key is absent.  The entry gets the default timeout
        again, as with Django's generic incr().
        """
        made = self.make_and_validate_key(key, version=version)
        cache = self.fastmmap_cache
        expire_on = self._expire_on(DEFAULT_TIMEOUT)
        if expire_on == _EXPIRED:
            expire_on = 1  # in the past: stored already expired

        def bump(_key: Any, old: Any) -> Any:
            if old is None:
                raise _NotFound
            return old + delta

        try:
            return cache.get_and_set(made, bump, expire_on=expire_on)
        except _NotFound:
            pass
        # get_and_set passes None both for a missing key and a stored None.
        if cache.get(made, _MISSING) is None:  # as Django's generic incr(): None + delta
            raise TypeError(f"unsupported operand type(s) for +: 'NoneType' and '{type(delta).__name__}'")
        raise ValueError(f"Key '{key}' not found") from None

    def decr(self, key: Any, delta: Any = 1, version: Any = None) -> Any:
        return self.incr(key, -delta, version=version)

    def set_many(self, data: Mapping[Any, Any], timeout: Any = DEFAULT_TIMEOUT, version: Any = None) -> list[Any]:
        """Store every item; return the keys that could not be stored (too big)."""
        cache = self.fastmmap_cache
        expire_on = self._expire_on(timeout)
        failed = []
        for key, value in data.items():
            made = self.make_and_validate_key(key, version=version)
            if not self._store(cache, made, value, expire_on):
                failed.append(key)
        return failed

    def delete_many(self, keys: Iterable[Any], version: Any = None) -> None:
        cache = self.fastmmap_cache
        for key in keys:
            cache.remove(self.make_and_validate_key(key, version=version))

    def clear(self) -> None:
        """Remove every entry of the file (all prefixes and versions)."""
        self.fastmmap_cache.clear()

    def close(self, **kwargs: Any) -> None:
        """Called at the end of every request: keeps the mapping open."""

    # ----- async: each call takes microseconds (no I/O; page locks are held
    # only for the length of one operation), so they run inline in the event
    # loop instead of in a thread through sync_to_async.  This also keeps
    # aincr/adecr atomic: Django's defaults compose them of aget and aset. -----

    async def aadd(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None) -> bool:
        return self.add(key, value, timeout, version)

    async def aget(self, key: Any, default: Any = None, version: Any = None) -> Any:
        return self.get(key, default, version)

    async def aset(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None) -> None:
        self.set(key, value, timeout, version)

    async def atouch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None) -> bool:
        return self.touch(key, timeout, version)

    async def adelete(self, key: Any, version: Any = None) -> bool:
        return self.delete(key, version)

    async def aget_many(self, keys: Iterable[Any], version: Any = None) -> dict[Any, Any]:
        return self.get_many(keys, version)

    async def ahas_key(self, key: Any, version: Any = None) -> bool:
        return self.has_key(key, version)

    async def aincr(self, key: Any, delta: Any = 1, version: Any = None) -> Any:
        return self.incr(key, delta, version)

    async def adecr(self, key: Any, delta: Any = 1, version: Any = None) -> Any:
        return self.decr(key, delta, version)

    async def aset_many(
        self, data: Mapping[Any, Any], timeout: Any = DEFAULT_TIMEOUT, version: Any = None
    ) -> list[Any]:
        return self.set_many(data, timeout, version)

    async def adelete_many(self, keys: Iterable[Any], version: Any = None) -> None:
        self.delete_many(keys, version)

    async def aclear(self) -> None:
        self.clear()

    async def aclose(self, **kwargs: Any) -> None:
        self.close(**kwargs)
