"""aiocache backend storing entries in a fastmmap file shared by processes.

For asyncio applications (FastAPI, Starlette, aiohttp) served by several
worker processes: every worker that opens the same file shares one cache,
with no server in between::

    from fastmmap.contrib.aiocache import FastMmapCache

    cache = FastMmapCache("/dev/shm/app.cache", cache_size="64m", namespace="app:")
    await cache.set("user:42", {"name": "Ada"}, ttl=60)
    await cache.increment("hits")          # atomic across processes

The calls run inline, in the event loop's thread, not in an executor: an
operation does no I/O (the file is memory-mapped) and holds a page lock for
the time of one copy, so it never waits for longer than another process
holds that page.  Handing each call to a thread would cost more than the
call itself.

aiocache's API works as documented: ``get``, ``multi_get``, ``set``,
``multi_set``, ``add``, ``exists``, ``increment``, ``expire``, ``delete``,
``clear``, ``raw``, the ``cached`` / ``multi_cached`` decorators, and its
locks: ``RedLock`` (``add`` of the lock key, released only by its owner,
atomically) and ``OptimisticLock`` (``set`` with ``_cas_token``, a
compare-and-set under the key's page lock).  ``increment`` is atomic across
processes.  Values go through aiocache's serializer (``NullSerializer`` by
default: objects as they are) and then fastmmap's (pickle by default), so
"Security and trust" in the fastmmap manual applies to the file.
"""

from __future__ import annotations

import inspect
import os
import threading
import time
from typing import Any

# aiocache ships no type hints
from aiocache.base import BaseCache  # type: ignore[import-untyped]
from aiocache.serializers import NullSerializer  # type: ignore[import-untyped]

import fastmmap

__all__ = ["FastMmapCache"]

#: fastmmap.Cache options accepted as keyword arguments.
_CACHE_OPTIONS = frozenset(inspect.signature(fastmmap.Cache.__init__).parameters) - {"self", "share_file", "anonymous"}
_MISSING = object()

# Serializes the first opening of a backend's file among threads; replaced
# in a forked child, in case another thread held it at the fork.
_open_lock = threading.Lock()


def _reset_open_lock() -> None:
    global _open_lock
    _open_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_open_lock)


def _expire_on(ttl: float | None) -> float:
    """aiocache ttl (seconds, None or 0 = no expiry) -> fastmmap expire_on (0 = never)."""
    return time.time() + ttl if ttl else 0


class FastMmapCache(BaseCache):  # type: ignore[misc]  # BaseCache is Any to mypy
    """An aiocache cache in a file shared by every process that opens it.

    :param share_file: path of the cache file (required).
    :param serializer: an aiocache serializer (default ``NullSerializer``).
    :param namespace, key_builder, timeout, ttl, plugins: as in aiocache.
    :param options: :class:`fastmmap.Cache` options (``cache_size``,
        ``page_size``, ``compressor``...); ``unlink_on_exit`` defaults to
        False: the file outlives the process that created it.

    The file is opened on first use in each process; a process forked
    after that keeps using its parent's mapping.
    """

    NAME = "fastmmap"

    def __init__(
        self,
        share_file: str | os.PathLike[str] | None = None,
        serializer: Any = None,
        *,
        namespace: str | None = None,
        key_builder: Any = None,
        timeout: float | None = 5,
        ttl: float | None = None,
        plugins: Any = None,
        **options: Any,
    ) -> None:
        if not share_file:
            raise ValueError("the fastmmap aiocache backend needs share_file, the path of the cache file")
        unknown = set(options) - _CACHE_OPTIONS
        if unknown:
            raise TypeError(
                f"FastMmapCache: unknown option(s) {', '.join(sorted(unknown))}; options are the "
                f"aiocache ones and the fastmmap.Cache options: {', '.join(sorted(_CACHE_OPTIONS))}"
            )
        super().__init__(
            serializer=serializer or NullSerializer(), plugins=plugins, namespace=namespace,
            key_builder=key_builder, timeout=timeout, ttl=ttl,
        )
        options.setdefault("unlink_on_exit", False)
        self._share_file = os.path.abspath(os.fspath(share_file))
        self._options = options
        self._fmm: fastmmap.Cache | None = None

    @classmethod
    def parse_uri_path(cls, path: str) -> dict[str, Any]:
        """``fastmmap:///dev/shm/app.cache`` for aiocache's ``Cache.from_url``."""
        return {"share_file": path}

    @property
    def fastmmap_cache(self) -> fastmmap.Cache:
        """The underlying fastmmap.Cache, opened on first use in this process."""
        cache = self._fmm
        if cache is None or cache.closed:
            with _open_lock:
                cache = self._fmm
                if cache is None or cache.closed:
                    cache = self._fmm = fastmmap.Cache(self._share_file, **self._options)
        return cache

    def _store(self, cache: fastmmap.Cache, key: str, value: Any, ttl: float | None) -> bool:
        if cache.set(key, value, expire_on=_expire_on(ttl)):
            return True
        cache.remove(key)  # too big for a page: do not leave the old value
        return False

    # ----- aiocache's backend methods -----

    async def _get(self, key: str, encoding: str = "utf-8", _conn: Any = None) -> Any:
        return self.fastmmap_cache.get(key)

    async def _gets(self, key: str, encoding: str = "utf-8", _conn: Any = None) -> Any:
        return self.fastmmap_cache.get(key)

    async def _multi_get(self, keys: list[str], encoding: str = "utf-8", _conn: Any = None) -> list[Any]:
        cache = self.fastmmap_cache
        return [cache.get(key) for key in keys]

    async def _set(
        self, key: str, value: Any, ttl: float | None = None, _cas_token: Any = None, _conn: Any = None
    ) -> Any:
        cache = self.fastmmap_cache
        if _cas_token is None:
            return self._store(cache, key, value, ttl)
        # OptimisticLock: store only if the value is still the one read
        with cache.lock(key) as entry:
            if entry.value != _cas_token:
                return 0
            try:
                entry.set(value, expire_time=ttl if ttl else 0)
            except fastmmap.ItemTooLargeError:
                entry.remove()
                return False
        return True

    async def _multi_set(self, pairs: Any, ttl: float | None = None, _conn: Any = None) -> bool:
        cache = self.fastmmap_cache
        stored = True
        for key, value in pairs:
            stored = self._store(cache, key, value, ttl) and stored
        return stored

    async def _add(self, key: str, value: Any, ttl: float | None = None, _conn: Any = None) -> bool:
        if not self.fastmmap_cache.add(key, value, expire_on=_expire_on(ttl)):
            raise ValueError(f"Key {key} already exists, use .set to update the value")
        return True

    async def _exists(self, key: str, _conn: Any = None) -> bool:
        return self.fastmmap_cache.exists(key)

    async def _increment(self, key: str, delta: int, _conn: Any = None) -> int:
        def add(_key: str, old: Any) -> int:
            if old is None:
                return delta
            try:
                return int(old) + delta
            except (TypeError, ValueError):
                raise TypeError("Value is not an integer") from None

        # under the key's page lock: atomic across processes
        result: int = self.fastmmap_cache.get_and_set(key, add)
        return result

    async def _expire(self, key: str, ttl: float | None, _conn: Any = None) -> bool:
        return self.fastmmap_cache.touch(key, expire_on=_expire_on(ttl))

    async def _delete(self, key: str, _conn: Any = None) -> int:
        return 1 if self.fastmmap_cache.remove(key) else 0

    async def _clear(self, namespace: str | None = None, _conn: Any = None) -> bool:
        cache = self.fastmmap_cache
        if not namespace:
            cache.clear()
            return True
        bprefix = namespace.encode("utf-8")
        for key in cache.keys():  # a snapshot; keys come back as str or bytes
            if key.startswith(bprefix) if isinstance(key, bytes) else key.startswith(namespace):
                cache.remove(key)
        return True

    async def _raw(self, command: str, *args: Any, encoding: str = "utf-8", _conn: Any = None,
                   **kwargs: Any) -> Any:
        return getattr(self.fastmmap_cache, command)(*args, **kwargs)

    async def _redlock_release(self, key: str, value: Any) -> int:
        # only the lock's owner (who stored value) releases it
        with self.fastmmap_cache.lock(key) as entry:
            if entry.value == value:
                entry.remove()
                return 1
        return 0

    async def _close(self, *args: Any, _conn: Any = None, **kwargs: Any) -> None:
        # aiocache closes a cache at the end of "async with" and of each
        # use by its decorators: the mapping stays open for the next call
        return None
