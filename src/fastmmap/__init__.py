"""fastmmap: a key/value cache shared by every process on one host.

The cache lives in one mmap'ed file split into pages; each page has its own
robust, process-shared lock, LRU eviction and expiry.  The engine is C;
``Cache`` is a thin Python subclass of the C type, so ``get``, ``set``,
``[]`` and ``in`` go straight from the call into C.

    >>> import fastmmap
    >>> cache = fastmmap.Cache("/dev/shm/app.cache", cache_size="64m", expire_time="1h")
    >>> cache["user:42"] = {"name": "Ada"}
    >>> cache.get("user:42")
    {'name': 'Ada'}
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import weakref
import zlib
from collections.abc import MutableMapping

from . import _fastmmap as _C
from . import _options
from ._fastmmap import (
    BadFileError,
    CacheBase,
    Error,
    FileReplacedError,
    GeometryError,
    LockTimeout,
    RecursiveLockError,
)

__all__ = [
    "Cache",
    "Error",
    "LockTimeout",
    "GeometryError",
    "BadFileError",
    "RecursiveLockError",
    "FileReplacedError",
]
__version__ = "0.1.0"

_MISSING = object()
DEFAULT_COMPRESS_THRESHOLD = 128

# Caches that have something to do at interpreter exit (unlink or flush),
# closed by the atexit hook below in the process that created them.
_exit_registry: "weakref.WeakSet[Cache]" = weakref.WeakSet()


@atexit.register
def _close_all_at_exit() -> None:
    for cache in list(_exit_registry):
        try:
            cache.close()
        except Exception:  # pragma: no cover - best effort at exit
            pass


def _json_dumps(obj):
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _resolve_serializer(serializer):
    """Return (type code, dumps, loads) for the serializer option."""
    if serializer == "pickle":
        return _C.T_PICKLE, None, None
    if serializer == "json":
        return _C.T_JSON, _json_dumps, None
    if serializer is None or serializer == "raw":
        return _C.SER_RAW, None, None
    if isinstance(serializer, tuple) and len(serializer) == 2:
        dumps, loads = serializer
        if not (callable(dumps) and callable(loads)):
            raise TypeError("serializer=(dumps, loads) must be a pair of callables")
        return _C.T_CUSTOM, dumps, loads
    raise ValueError(
        f"serializer must be 'pickle', 'json', 'raw', None or a (dumps, loads) pair, got {serializer!r}"
    )


def _resolve_compressor(compressor):
    """Return (type code, compress, decompress) for the compressor option."""
    if compressor is None:
        return _C.C_NONE, None, None
    if compressor == "zlib":
        return _C.C_ZLIB, zlib.compress, None
    if compressor == "lz4":
        try:
            import lz4.frame
        except ImportError:
            raise ImportError(
                "compressor='lz4' needs the lz4 package: pip install fastmmap[lz4]"
            ) from None
        return _C.C_LZ4, lz4.frame.compress, None
    if isinstance(compressor, tuple) and len(compressor) == 2:
        compress, decompress = compressor
        if not (callable(compress) and callable(decompress)):
            raise TypeError("compressor=(compress, decompress) must be a pair of callables")
        return _C.C_CUSTOM, compress, decompress
    raise ValueError(
        f"compressor must be None, 'zlib', 'lz4' or a (compress, decompress) pair, got {compressor!r}"
    )


def _default_dir() -> str:
    """A new private (0700) directory for a cache file, in memory when possible."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="fastmmap-", dir=base)


def _reopen(share_file, options):
    return Cache(share_file, **options)


class Cache(CacheBase):
    """A key/value cache in a memory-mapped file, shared by processes.

    Parameters follow Cache::FastMmap; see the README for the full table.
    share_file=None creates a private temporary file, removed at close or
    exit.  Keys are str (stored as UTF-8) or bytes; values are bytes and str
    (stored natively), None, or any object the serializer accepts.
    """

    def __init__(
        self,
        share_file=None,
        *,
        init_file=False,
        cache_size=None,
        page_size=None,
        num_pages=None,
        start_slots=None,
        expire_time=0,
        enable_stats=False,
        permissions=0o600,
        unlink_on_exit=None,
        empty_on_exit=False,
        lock_timeout=None,
        serializer="pickle",
        compressor=None,
        compress_threshold=DEFAULT_COMPRESS_THRESHOLD,
        anonymous=False,
    ):
        geometry = _options.compute_geometry(cache_size, page_size, num_pages)
        slots = _options.parse_start_slots(start_slots)
        perms = _options.parse_permissions(permissions)
        timeout = _options.parse_lock_timeout(lock_timeout)
        default_expire = _options.parse_expire_time(expire_time)
        ser_type, dumps, loads = _resolve_serializer(serializer)
        comp_type, compress, decompress = _resolve_compressor(compressor)
        if isinstance(compress_threshold, bool) or not isinstance(compress_threshold, int) or compress_threshold < 0:
            raise ValueError(f"compress_threshold must be an int >= 0, got {compress_threshold!r}")
        if anonymous and share_file is not None:
            raise ValueError("anonymous=True keeps the cache in memory: do not pass share_file")

        private_dir = None
        if anonymous:
            path = None
        elif share_file is None:
            private_dir = _default_dir()
            path = os.path.join(private_dir, "cache")
        else:
            path = os.fspath(share_file)
            if not isinstance(path, str):
                path = os.fsdecode(path)

        page, pages = geometry if geometry else (0, 0)
        # Which dimensions the caller fixed: an existing file must agree on those.
        explicit = 3 if cache_size is not None else (
            (1 if page_size is not None else 0) | (2 if num_pages is not None else 0))
        try:
            created = self._open(
                path, page, pages, slots or 0, explicit, bool(init_file), perms,
                bool(anonymous), bool(enable_stats),
            )
        except BaseException:
            if private_dir:
                shutil.rmtree(private_dir, ignore_errors=True)
            raise
        self._configure(
            default_expire, timeout, ser_type, dumps, loads, comp_type, compress, decompress,
            compress_threshold, _options.parse_expire_time,
        )
        self._share_file = path
        self._private_dir = private_dir
        self._expire_time = default_expire
        self._creator_pid = os.getpid()
        self._created = bool(created)
        self._unlink_on_exit = (bool(created) if unlink_on_exit is None else bool(unlink_on_exit)) and not anonymous
        self._empty_on_exit = bool(empty_on_exit)
        self._reopen_options = dict(
            expire_time=expire_time, enable_stats=enable_stats, lock_timeout=lock_timeout,
            serializer=serializer, compressor=compressor, compress_threshold=compress_threshold,
        )
        if self._unlink_on_exit or self._empty_on_exit:
            _exit_registry.add(self)

    # ----- properties -----

    @property
    def share_file(self):
        """Path of the cache file (None for an anonymous cache)."""
        return self._share_file

    @property
    def expire_time(self):
        """Default time to live in seconds (0 = never, -1 = expire at once)."""
        return self._expire_time

    # ----- lifecycle -----

    def close(self):
        """Close the cache.  Idempotent; later operations raise ValueError.

        In the process that created the file, unlink_on_exit removes it.
        """
        if self.closed:
            return
        if getattr(self, "_creator_pid", None) == os.getpid():
            if self._empty_on_exit:
                self.empty()
            unlink = self._unlink_on_exit
        else:
            unlink = False
        super().close()
        _exit_registry.discard(self)
        if unlink and self._share_file:
            try:
                os.unlink(self._share_file)
            except FileNotFoundError:
                pass
            if self._private_dir:
                shutil.rmtree(self._private_dir, ignore_errors=True)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __reduce__(self):
        if self._share_file is None:
            raise TypeError("an anonymous cache cannot be pickled: create it before forking instead")
        return (_reopen, (self._share_file, self._reopen_options))

    def __repr__(self):
        state = "closed" if self.closed else f"{self.num_pages} pages of {self.page_size} bytes"
        return f"<fastmmap.Cache {self._share_file!r} {state}>"

    # ----- Cache::FastMmap methods written in Python (not on the hot path) -----

    def expire(self, key):
        """Remove key now (as if it had expired)."""
        self.remove(key)

    def empty(self, only_expired=False):
        """Remove expired entries (only_expired=True) or all entries."""
        if only_expired:
            self.purge()
        else:
            self.clear()

    def get_keys(self, mode=0):
        """List live entries.

        mode 0: the keys; 1: dicts with key, last_access, expire_on and flags;
        2: the same plus the decoded value.
        """
        entries = self._entries(mode)
        if mode == 0:
            return entries
        fields = ("key", "last_access", "expire_on", "flags", "value")
        n = 5 if mode == 2 else 4
        return [dict(zip(fields[:n], e[:n])) for e in entries]

    # ----- mapping protocol -----

    def __iter__(self):
        return iter(self._entries(0))

    def keys(self):
        """A list of the live keys (a snapshot)."""
        return self._entries(0)

    def values(self):
        """A list of the live values (a snapshot)."""
        return [e[4] for e in self._entries(2)]

    def items(self):
        """A list of (key, value) pairs (a snapshot)."""
        return [(e[0], e[4]) for e in self._entries(2)]

    def pop(self, key, default=_MISSING):
        """Remove key and return its value; default (or KeyError) if absent."""
        value = self.get_and_remove(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise KeyError(key)
            return default
        return value

    def popitem(self):
        """Remove and return some (key, value) pair; KeyError if empty."""
        for key in self._entries(0):
            value = self.get_and_remove(key, _MISSING)
            if value is not _MISSING:
                return key, value
        raise KeyError("popitem(): cache is empty")

    def setdefault(self, key, default=None):
        """Return the value of key, storing default first if it is absent (atomically)."""
        while True:
            value = self.get(key, _MISSING)
            if value is not _MISSING:
                return value
            if self.add(key, default):
                return default

    def update(self, other=(), /, **kwargs):
        """Store every item of other (a mapping or pairs) and of kwargs."""
        pairs = [(k, other[k]) for k in other.keys()] if hasattr(other, "keys") else other
        for key, value in pairs:
            self[key] = value
        for key, value in kwargs.items():
            self[key] = value


MutableMapping.register(Cache)
