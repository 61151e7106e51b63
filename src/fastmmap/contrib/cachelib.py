"""cachelib (and so Flask-Caching) backend storing entries in a fastmmap file.

Every process that opens the same file shares one cache, with no server in
between.  With cachelib directly::

    from fastmmap.contrib.cachelib import FastMmapCache
    cache = FastMmapCache("/dev/shm/app.cache", default_timeout=300, cache_size="64m")

With Flask-Caching::

    app.config["CACHE_TYPE"] = "fastmmap.contrib.cachelib.FastMmapCache"
    app.config["CACHE_OPTIONS"] = {"share_file": "/dev/shm/app.cache", "cache_size": "64m"}

Timeouts follow cachelib: ``None`` is the default timeout, ``0`` never
expires, a negative timeout expires at once (the key is removed); but a
float or ``timedelta`` keeps its milliseconds (cachelib rounds it up to
whole seconds, and warns that floats are deprecated).  ``inc``
and ``dec`` are atomic across processes.  Values go through fastmmap's
serializer (pickle by default), so anyone who can write the file can run
code in the processes that read it: see "Security and trust" in the
fastmmap manual.

A cachelib serializer (an object with ``dumps(value) -> bytes`` and
``loads(bytes)``, such as ``cachelib.serializers.JSONSerializer``) replaces
fastmmap's own when it is assigned to ``cache.serializer``, passed as
``serializer=``, or set through Flask-Caching's ``CACHE_SERIALIZER``: values
are then stored as the bytes it returns, as cachelib's own backends do.
"""

from __future__ import annotations

import datetime as dt
import inspect
import math
import os
import threading
import time
from typing import Any

from cachelib import BaseCache
from cachelib.serializers import SimpleSerializer

import fastmmap

from . import _web

__all__ = ["FastMmapCache", "NativeSerializer", "fastmmap_cache"]

#: fastmmap.Cache options accepted as keyword arguments.
_CACHE_OPTIONS = frozenset(inspect.signature(fastmmap.Cache.__init__).parameters) - {"self", "share_file", "anonymous"}
#: expire_on is stored as an unsigned 32-bit number of unix seconds.
_MAX_EXPIRE_ON = float(2**32 - 1)
#: _expire_on() result for a negative timeout: the entry must not be stored.
_EXPIRED = -1
#: File name used inside Flask-Caching's CACHE_DIR by the factory.
DEFAULT_FILE_NAME = "fastmmap.cache"

# Serializes the first opening of a backend's file among threads; replaced in
# a forked child, in case another thread held it at the fork.
_open_lock = threading.Lock()


def _reset_open_lock() -> None:
    global _open_lock
    _open_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_open_lock)


class NativeSerializer(SimpleSerializer):
    """The default serializer: values go to fastmmap as they are.

    fastmmap's own serializer (the ``serializer`` option, pickle by
    default) then stores them, so that the file holds the same entries as a
    plain ``fastmmap.Cache`` writes.  It is a cachelib ``SimpleSerializer``
    (pickle) for code that inspects ``cache.serializer`` or calls its
    ``dumps``/``loads``; a subclass of it is used as any other serializer.
    """


class FastMmapCache(BaseCache):
    """A cachelib cache in a file shared by every process that opens it.

    :param share_file: path of the cache file (required).
    :param default_timeout: seconds (or a ``timedelta``) for ``timeout=None``;
        ``0`` never expires.
    :param key_prefix: prepended to every key; ``clear()`` then removes only
        the keys with this prefix.
    :param ignore_delete_many_errors: as in cachelib.
    :param raise_too_large: raise ``fastmmap.ItemTooLargeError`` for a value
        too large for a page, instead of logging a warning once per size
        class (Flask-Caching's factory sets it from ``app.debug``).
    :param options: :class:`fastmmap.Cache` options (``cache_size``,
        ``page_size``, ``serializer``, ``compressor``, ``lock_timeout``...).
        ``unlink_on_exit`` defaults to False: the file outlives the process
        that created it.

    The file is opened on first use in each process; a process forked after
    that keeps using the parent's mapping.

    ``serializer`` is either fastmmap's option (``"pickle"``, ``"json"``,
    ``"raw"``, a ``(dumps, loads)`` pair) or a cachelib serializer object,
    which becomes the ``serializer`` attribute.
    """

    #: A cachelib serializer (``dumps(value) -> bytes``, ``loads(bytes)``);
    #: NativeSerializer (or None) for fastmmap's own (the ``serializer``
    #: option).  Read at every call, so that assigning it after construction
    #: (as Flask-Caching does for CACHE_SERIALIZER) takes effect.
    serializer: Any = NativeSerializer()

    def __init__(
        self,
        share_file: str | os.PathLike[str] | None = None,
        default_timeout: Any = 300,
        *,
        key_prefix: str = "",
        ignore_delete_many_errors: bool = True,
        raise_too_large: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(default_timeout, ignore_delete_many_errors=ignore_delete_many_errors)
        if not share_file:
            raise ValueError(
                "FastMmapCache needs share_file, the path of the cache file "
                "(with Flask-Caching: CACHE_OPTIONS = {'share_file': ...})"
            )
        unknown = set(options) - _CACHE_OPTIONS
        if unknown:
            raise TypeError(
                f"FastMmapCache: unknown option(s) {', '.join(sorted(unknown))}; options are "
                f"key_prefix and the fastmmap.Cache options: {', '.join(sorted(_CACHE_OPTIONS))}"
            )
        ser = options.get("serializer")
        if hasattr(ser, "dumps") and hasattr(ser, "loads"):
            self.serializer = options.pop("serializer")
        options.setdefault("unlink_on_exit", False)
        self.key_prefix = key_prefix or ""
        self.raise_too_large = bool(raise_too_large)
        self._share_file = os.path.abspath(os.fspath(share_file))
        self._options = options
        self._fmm: fastmmap.Cache | None = None

    @classmethod
    def factory(cls, app: Any, config: dict[str, Any], args: list[Any], kwargs: dict[str, Any]) -> FastMmapCache:
        """Flask-Caching's factory protocol: ``factory(app, config, args, kwargs)``.

        The file is ``CACHE_ARGS[0]``, else ``CACHE_OPTIONS["share_file"]``,
        else ``fastmmap.cache`` in ``CACHE_DIR`` (created 0700 if absent; an
        existing one must pass fastmmap's trust check, else
        ``fastmmap.UntrustedFileError``).
        ``CACHE_KEY_PREFIX`` becomes ``key_prefix`` unless CACHE_OPTIONS sets it.
        """
        args = list(args)
        kwargs = dict(kwargs)
        if not args and not kwargs.get("share_file"):
            cache_dir = config.get("CACHE_DIR")
            if not cache_dir:
                raise ValueError(
                    "FastMmapCache: set CACHE_OPTIONS = {'share_file': path} or CACHE_DIR (a directory)"
                )
            os.makedirs(cache_dir, mode=0o700, exist_ok=True)
            # an existing directory is reused: it must be as private as a
            # cache file (see fastmmap's "Security and trust")
            fastmmap._check_dir(cache_dir, kwargs.get("permissions", 0o600))
            kwargs["share_file"] = os.path.join(cache_dir, DEFAULT_FILE_NAME)
        kwargs.setdefault("key_prefix", config.get("CACHE_KEY_PREFIX") or "")
        kwargs.setdefault("raise_too_large", bool(getattr(app, "debug", False)))
        return cls(*args, **kwargs)

    # ----- the fastmmap.Cache -----

    @property
    def fastmmap_cache(self) -> fastmmap.Cache:
        """The underlying fastmmap.Cache, opened on first use in this process.

        Keys there carry ``key_prefix``.
        """
        cache = self._fmm
        if cache is None or cache.closed:
            with _open_lock:
                cache = self._fmm
                if cache is None or cache.closed:
                    cache = self._fmm = _web.open_cache(self._share_file, self._options)
        return cache

    def _expire_on(self, timeout: Any) -> float:
        """cachelib timeout -> fastmmap expire_on (0 = never) or _EXPIRED."""
        if timeout is None:
            timeout = self.default_timeout
        # fastmmap keeps milliseconds: no rounding up to a second (nor
        # cachelib's deprecation of floats, which is about that rounding)
        seconds: float
        if isinstance(timeout, float) and math.isfinite(timeout):
            seconds = timeout
        elif isinstance(timeout, dt.timedelta):
            seconds = timeout.total_seconds()
        else:
            seconds = self._normalize_timeout(timeout)
        if seconds == 0:
            return 0
        if seconds < 0:
            return _EXPIRED
        return min(time.time() + seconds, _MAX_EXPIRE_ON)

    def _dumps(self, value: Any) -> Any:
        """value as stored: the serializer's bytes, or value itself without one.

        None means the serializer could not encode it (cachelib's
        serializers log the error and return None).
        """
        serializer = self.serializer
        if serializer is None or type(serializer) is NativeSerializer:
            return value
        return serializer.dumps(value)

    def _loads(self, stored: Any) -> Any:
        """The value of a stored entry (None for a miss)."""
        serializer = self.serializer
        # Only bytes come from a serializer; anything else was written by a
        # process configured without one, and is returned as fastmmap read it.
        if serializer is None or type(serializer) is NativeSerializer or not isinstance(stored, bytes):
            return stored
        return serializer.loads(stored)

    def _store(self, cache: fastmmap.Cache, key: str, value: Any, expire_on: float) -> bool:
        if expire_on == _EXPIRED:
            cache.remove(key)
            return True
        stored = self._dumps(value)
        if (stored is not None or value is None) and cache.set(key, stored, expire_on=expire_on):
            return True
        cache.remove(key)  # too big for a page, or not encodable: do not leave the old value
        if stored is not None or value is None:
            _web.report(cache, key, value if stored is None else stored, debug=self.raise_too_large)
        return False

    # ----- cachelib.BaseCache -----

    def get(self, key: str) -> Any:
        return self._loads(self.fastmmap_cache.get(self.key_prefix + key))

    def get_many(self, *keys: str) -> list[Any]:
        cache, prefix = self.fastmmap_cache, self.key_prefix
        return [self._loads(cache.get(prefix + key)) for key in keys]

    def set(self, key: str, value: Any, timeout: Any = None) -> bool:
        return self._store(self.fastmmap_cache, self.key_prefix + key, value, self._expire_on(timeout))

    def add(self, key: str, value: Any, timeout: Any = None) -> bool:
        cache = self.fastmmap_cache
        key = self.key_prefix + key
        expire_on = self._expire_on(timeout)
        if expire_on == _EXPIRED:
            return not cache.exists(key)
        stored = self._dumps(value)
        if stored is None and value is not None:
            return False
        try:
            return cache.add(key, stored, expire_on=expire_on)
        except fastmmap.ItemTooLargeError:
            _web.report(cache, key, value, debug=self.raise_too_large)
            return False

    def set_many(self, mapping: dict[str, Any], timeout: Any = None) -> list[Any]:
        cache, prefix = self.fastmmap_cache, self.key_prefix
        expire_on = self._expire_on(timeout)
        return [key for key, value in mapping.items() if self._store(cache, prefix + key, value, expire_on)]

    def delete(self, key: str) -> bool:
        return self.fastmmap_cache.remove(self.key_prefix + key)

    def has(self, key: str) -> bool:
        return self.fastmmap_cache.exists(self.key_prefix + key)

    def clear(self) -> bool:
        """Remove every entry, or with a key_prefix every entry with that prefix."""
        cache = self.fastmmap_cache
        prefix = self.key_prefix
        if not prefix:
            cache.clear()
            return True
        bprefix = prefix.encode("utf-8")
        for key in cache.keys():  # a snapshot; keys come back as str or bytes
            if key.startswith(bprefix) if isinstance(key, bytes) else key.startswith(prefix):
                cache.remove(key)
        return True

    def inc(self, key: str, delta: int = 1) -> Any:
        """Add delta, atomically across processes; a missing key counts as 0.

        The entry gets the default timeout again, as with cachelib's
        generic inc().
        """
        expire_on = self._expire_on(None)
        if expire_on == _EXPIRED:
            expire_on = 1  # in the past: stored already expired
        new = None

        def add_delta(_key: Any, old: Any) -> Any:
            nonlocal new
            new = (self._loads(old) or 0) + delta
            return self._dumps(new)

        try:
            self.fastmmap_cache.get_and_set(self.key_prefix + key, add_delta, expire_on=expire_on)
        except fastmmap.ItemTooLargeError:
            return None
        return new

    def dec(self, key: str, delta: int = 1) -> Any:
        return self.inc(key, -delta)


def fastmmap_cache(*args: Any, **kwargs: Any) -> FastMmapCache:
    """Flask-Caching factory: ``fastmmap_cache(app, config, args, kwargs)``.

    See :meth:`FastMmapCache.factory`.  Flask-Caching calls a ``CACHE_TYPE``
    whose path contains "cachelib" (as this one does) like a cachelib class,
    ``fastmmap_cache(*CACHE_ARGS, default_timeout=..., **CACHE_OPTIONS)``;
    that call is passed on to :class:`FastMmapCache` unchanged.
    """
    if len(args) == 4 and not kwargs and isinstance(args[1], dict) and "CACHE_TYPE" in args[1]:
        return FastMmapCache.factory(*args)
    return FastMmapCache(*args, **kwargs)
