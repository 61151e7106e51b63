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
import errno
import os
import sys
import weakref
from collections.abc import MutableMapping

from . import _fastmmap as _C
from . import _options
from ._update import NO_CHANGE, Entry, Update
from ._fastmmap import (
    BadFileError,
    CacheBase,
    Error,
    FileReplacedError,
    GeometryError,
    ItemTooLargeError,
    LockTimeout,
    RecursiveLockError,
    UntrustedFileError,
    WriteBackLostError,
)

# Names for type checkers only (mypy treats TYPE_CHECKING as true); at run
# time nothing below is imported, not even the typing module.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping
    from os import PathLike
    from typing import Any, Literal, Self, TypeAlias

    from ._fastmmap import (
        _Codec,
        _DeleteCallback,
        _Dumps,
        _ExpireTime,
        _Key,
        _KeyT,
        _Loads,
        _ReadCallback,
        _WriteCallback,
    )

    #: serializer=: a built-in name, None (= "raw") or a (dumps, loads) pair.
    _Serializer: TypeAlias = Literal["pickle", "json", "raw"] | tuple[_Dumps, _Loads] | None
    #: compressor=: a built-in name, None or a (compress, decompress) pair.
    _Compressor: TypeAlias = Literal["zlib", "lz4"] | tuple[_Codec, _Codec] | None
    #: A (type code, dumps, loads) or (type code, compress, decompress) triple.
    _SerializerSpec: TypeAlias = tuple[int, _Dumps | None, _Loads | None]
    _CompressorSpec: TypeAlias = tuple[int, _Codec | None, _Codec | None]

__all__ = [
    "Cache",
    "Error",
    "LockTimeout",
    "GeometryError",
    "BadFileError",
    "RecursiveLockError",
    "FileReplacedError",
    "ItemTooLargeError",
    "UntrustedFileError",
    "WriteBackLostError",
    "Share",
    "LockedEntry",
    "LockedPage",
    "NO_CHANGE",
    "Update",
    "Entry",
]
__version__ = "0.1.0"

_MISSING = object()
_C._set_result_types(NO_CHANGE, Update, Entry)
DEFAULT_COMPRESS_THRESHOLD = 128

# Caches that have something to do at interpreter exit (unlink or flush),
# closed by the atexit hook below in the process that created them.
_exit_registry: "weakref.WeakSet[Cache]" = weakref.WeakSet()


@atexit.register
def _close_all_at_exit() -> None:
    for cache in list(_exit_registry):
        try:
            cache.close()
        except Exception as e:
            _report_close_failure(cache, e, "at exit")


def _report_close_failure(cache: Cache, e: Exception, when: str) -> None:
    # Nobody is left to catch the error: say so.  A failed empty_on_exit
    # flush left its entries in the file, which is then not unlinked.
    name = getattr(cache, "_share_file", None)
    print(f"fastmmap: closing the cache {name!r} {when} failed: {e!r}", file=sys.stderr)


# json, zlib, shutil and tempfile are imported where an option or method
# first needs them, not with fastmmap, so that `import fastmmap` stays cheap.


def _json_dumps(obj: Any) -> bytes:
    import json

    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _resolve_serializer(serializer: _Serializer) -> _SerializerSpec:
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


def _gzip_compress(data: bytes) -> bytes:
    """Compress::Zlib's memGzip format (a gzip member), as Perl's 'zlib' compressor writes."""
    import zlib

    z = zlib.compressobj(6, zlib.DEFLATED, 31)
    return z.compress(data) + z.flush()


def _gzip_decompress(data: bytes) -> bytes:
    """Read memGzip output (and, leniently, a zlib stream)."""
    import zlib

    return zlib.decompress(data, 47)


def _resolve_perl_compressor(compressor: _Compressor) -> _CompressorSpec:
    """Compressors in Cache::FastMmap's byte formats, for format='perl'.

    Perl compresses every value with no threshold and records nothing in the
    entry, so both sides must be configured alike.  'zlib' is
    Compress::Zlib's memGzip (gzip framing), 'lz4' is Compress::LZ4's
    compress (a 4-byte little-endian length, then an LZ4 block).
    """
    if compressor is None:
        return _C.C_NONE, None, None
    if compressor == "zlib":
        return _C.C_CUSTOM, _gzip_compress, _gzip_decompress
    if compressor == "lz4":
        try:
            import lz4.block  # type: ignore[import-untyped]  # lz4 ships no type hints
        except ImportError:
            raise ImportError(
                "compressor='lz4' needs the lz4 package: pip install fastmmap[lz4]"
            ) from None
        return _C.C_CUSTOM, lz4.block.compress, lz4.block.decompress
    return _resolve_compressor(compressor)


def _resolve_compressor(compressor: _Compressor) -> _CompressorSpec:
    """Return (type code, compress, decompress) for the compressor option."""
    if compressor is None:
        return _C.C_NONE, None, None
    if compressor == "zlib":
        import zlib

        return _C.C_ZLIB, zlib.compress, None
    if compressor == "lz4":
        try:
            import lz4.frame  # type: ignore[import-untyped]  # lz4 ships no type hints
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


def _owner_name(uid: int) -> str:
    import pwd

    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _check_dir(path: str, permissions: int = 0o600) -> None:
    """Refuse a directory for cache files that another user could fill.

    The engine's rule for an existing cache file, applied to a directory
    that is reused for one: owned by this user or root, and no group or
    other write permission beyond ``permissions`` (0: 0600).  A symbolic
    link is followed, and its target checked.
    """
    permissions = _options.parse_permissions(permissions) or 0o600
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    me = os.geteuid()
    mode = st.st_mode & 0o7777
    extra = mode & 0o022 & ~permissions
    if st.st_uid in (me, 0) and not extra:
        return
    if st.st_uid not in (me, 0):
        why = (f"this process runs as uid {me} and uses only its own directories or root's, since the owner "
               "of the directory can replace the cache file in it; remove it, or use it as its owner")
    else:
        who = {0o022: "group and others", 0o020: "the group"}.get(extra, "others")
        why = (f"it lets {who} write to it, beyond permissions=0o{permissions:o}; chmod it, or pass "
               f"permissions=0o{mode & 0o777:o} if those writers are trusted")
    raise UntrustedFileError(
        errno.EACCES, f"refusing a directory owned by {_owner_name(st.st_uid)} with mode {mode:04o}: {why}", path,
    )


def _default_dir() -> str:
    """A new private (0700) directory for a cache file, in memory when possible.

    mkdtemp makes a new directory (it never adopts an existing one); the
    check catches a file system that ignores the mode it asked for.
    """
    import shutil
    import tempfile

    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    path = tempfile.mkdtemp(prefix="fastmmap-", dir=base)
    try:
        _check_dir(path)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path


def _reopen(share_file: str, options: dict[str, Any]) -> Cache:
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
        share_file: str | bytes | PathLike[str] | PathLike[bytes] | None = None,
        *,
        init_file: bool = False,
        cache_size: int | str | None = None,
        page_size: int | str | None = None,
        num_pages: int | None = None,
        start_slots: int | None = None,
        expire_time: _ExpireTime = 0,
        tombstone_expire_time: _ExpireTime | None = None,
        enable_stats: bool = False,
        permissions: int = 0o600,
        unlink_on_exit: bool | None = None,
        empty_on_exit: bool = False,
        lock_timeout: float | None = None,
        serializer: _Serializer = "pickle",
        compressor: _Compressor = None,
        compress_threshold: int = DEFAULT_COMPRESS_THRESHOLD,
        anonymous: bool = False,
        context: Any = None,
        read_cb: _ReadCallback | None = None,
        write_cb: _WriteCallback | None = None,
        delete_cb: _DeleteCallback | None = None,
        write_action: Literal["write_through", "write_back"] = "write_through",
        cache_not_found: bool = False,
        allow_recursive: bool = False,
        format: Literal["native", "perl"] = "native",
    ) -> None:
        if format not in ("native", "perl"):
            raise ValueError(f"format must be 'native' or 'perl', got {format!r}")
        perl = format == "perl"
        geometry: tuple[int, int] | None
        if perl:
            geometry = _options.compute_perl_geometry(cache_size, page_size, num_pages)
            slots: int | None = _options.parse_perl_start_slots(start_slots)
        else:
            geometry = _options.compute_geometry(cache_size, page_size, num_pages)
            slots = _options.parse_start_slots(start_slots)
        perms = _options.parse_permissions(permissions)
        timeout = _options.parse_lock_timeout(lock_timeout)
        # Milliseconds: the native format's resolution (Perl's rounds up to seconds).
        default_expire = _options.parse_expire_time_ms(expire_time)
        tombstone_expire = (
            None if tombstone_expire_time is None
            else _options.parse_expire_time_ms(tombstone_expire_time, "tombstone_expire_time")
        )
        ser_type, dumps, loads = _resolve_serializer(serializer)
        if perl:
            if ser_type == _C.T_PICKLE:
                raise ValueError(
                    "format='perl' cannot use serializer='pickle' (Perl cannot read it): pass "
                    "serializer='raw' (bytes and str, Perl's serializer => '') or 'json' (Perl's "
                    "serializer => 'json'), or a (dumps, loads) pair both sides agree on"
                )
            if anonymous:
                raise ValueError("format='perl' needs a file that Perl processes can open; anonymous=True "
                                 "is for the native format only")
            comp_type, compress, decompress = _resolve_perl_compressor(compressor)
        else:
            comp_type, compress, decompress = _resolve_compressor(compressor)
        if (isinstance(compress_threshold, bool) or not isinstance(compress_threshold, int)
                or not 0 <= compress_threshold <= sys.maxsize):
            raise ValueError(f"compress_threshold must be an int from 0 to {sys.maxsize}, got {compress_threshold!r}")
        for name, cb in (("read_cb", read_cb), ("write_cb", write_cb), ("delete_cb", delete_cb)):
            if cb is not None and not callable(cb):
                raise TypeError(f"{name} must be callable or None, not {type(cb).__name__}")
        if write_action not in ("write_through", "write_back"):
            raise ValueError(f"write_action must be 'write_through' or 'write_back', got {write_action!r}")
        if anonymous and share_file is not None:
            raise ValueError("anonymous=True keeps the cache in memory: do not pass share_file")

        path: str | bytes | None  # str or None from here on, once decoded
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
            if perl:
                # the type the engine reports for Perl's plain (unflagged) values
                plain = _C.T_BYTES if ser_type == _C.SER_RAW else ser_type
                created = self._open(
                    path, page, pages, slots or 0, explicit, bool(init_file), perms,
                    False, bool(enable_stats), 1, plain | comp_type,
                )
            else:
                try:
                    created = self._open(
                        path, page, pages, slots or 0, explicit, bool(init_file), perms,
                        bool(anonymous), bool(enable_stats),
                    )
                except GeometryError:
                    # a file an earlier version made for the same cache_size,
                    # with 64 KiB pages: adopt it rather than refuse it
                    old = None if init_file else _options.legacy_geometry(cache_size, page_size, num_pages)
                    if old is None:
                        raise
                    created = self._open(
                        path, old[0], old[1], slots or 0, explicit, False, perms,
                        bool(anonymous), bool(enable_stats),
                    )
        except BaseException:
            if private_dir:
                import shutil

                shutil.rmtree(private_dir, ignore_errors=True)
            raise
        self._configure(
            default_expire, timeout, ser_type, dumps, loads, comp_type, compress, decompress,
            compress_threshold, _options.parse_expire_time_ms, tombstone_expire,
        )
        self._set_callbacks(
            context, read_cb, write_cb, delete_cb, write_action == "write_back",
            bool(cache_not_found), bool(allow_recursive),
        )
        self._context = context
        self._write_cb = write_cb
        self._delete_cb = delete_cb
        self._write_back = write_action == "write_back"
        self._share_file = path
        self._file_id = None
        if path is not None:
            st = os.stat(path)
            self._file_id = (st.st_dev, st.st_ino)
        self._private_dir = private_dir
        self._expire_time: float = default_expire  # 0 and EXPIRE_NOW
        if default_expire > 0:
            # seconds: whole in Perl's format (rounded up, as stored), else
            # with the milliseconds, an int when there are none
            secs, ms = divmod(default_expire, 1000)
            self._expire_time = secs + (ms > 0) if perl else secs if ms == 0 else default_expire / 1000
        self._creator_pid = os.getpid()
        self._created = bool(created)
        self._unlink_on_exit = (bool(created) if unlink_on_exit is None else bool(unlink_on_exit)) and not anonymous
        self._empty_on_exit = bool(empty_on_exit)
        self._reopen_options: dict[str, Any] = dict(
            expire_time=expire_time, tombstone_expire_time=tombstone_expire_time,
            enable_stats=enable_stats, lock_timeout=lock_timeout,
            serializer=serializer, compressor=compressor, compress_threshold=compress_threshold,
            context=context, read_cb=read_cb, write_cb=write_cb, delete_cb=delete_cb,
            write_action=write_action, cache_not_found=cache_not_found, allow_recursive=allow_recursive,
            format=format,
        )
        if perl:  # the geometry is not in the file: reopening needs it
            self._reopen_options.update(page_size=page, num_pages=pages, start_slots=slots)
        if self._unlink_on_exit or self._empty_on_exit:
            _exit_registry.add(self)

    # ----- properties -----

    @property
    def share_file(self) -> str | None:
        """Path of the cache file (None for an anonymous cache)."""
        return self._share_file

    @property
    def expire_time(self) -> float:
        """Default time to live in seconds (0 = never, -1 = expire at once); an
        int, or a float with milliseconds (the native format's resolution)."""
        return self._expire_time

    # ----- lifecycle -----

    def close(self) -> None:
        """Close the cache.  Idempotent; later operations raise ValueError.

        In the process that created the file, unlink_on_exit removes it.
        With empty_on_exit, a flush that fails (write_cb raised) raises here
        and leaves the cache open, its unwritten entries still in it: call
        close() again once the store works.
        """
        if self.closed:
            return
        # a lock block still open in this thread would make empty() fail
        # and keep its page locked: release it first (CacheBase.close too)
        self._release_locks()
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
                st = os.stat(self._share_file)
                # only our own file: another cache may have replaced it
                if (st.st_dev, st.st_ino) == self._file_id:
                    os.unlink(self._share_file)
            except FileNotFoundError:
                pass
            if self._private_dir:
                import shutil

                shutil.rmtree(self._private_dir, ignore_errors=True)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception as e:
            _report_close_failure(self, e, "at garbage collection")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Callable[[str, dict[str, Any]], Cache], tuple[str, dict[str, Any]]]:
        if self._share_file is None:
            raise TypeError("an anonymous cache cannot be pickled: create it before forking instead")
        return (_reopen, (self._share_file, self._reopen_options))

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.num_pages} pages of {self.page_size} bytes"
        return f"<fastmmap.Cache {self._share_file!r} {state}>"

    # ----- Cache::FastMmap methods written in Python (not on the hot path) -----

    def lock(self, key: _Key) -> LockedEntry:
        """Hold the page lock of key for a with block; yields a LockedEntry.

        ``with cache.lock("hits") as e: e.value = (e.value or 0) + 1`` is an
        atomic increment across threads and processes.  Inside the block,
        use the entry, not the cache: other cache calls on the same page
        would raise RecursiveLockError.
        """
        return LockedEntry(self, key)

    def page(self, page_key: _Key) -> LockedPage:
        """Hold the lock of the page chosen by page_key; yields a LockedPage.

        The page maps keys the way multi_get/multi_set do for page_key.
        """
        return LockedPage(self, page_key)

    def get_keys(self, mode: int = 0) -> list[Any]:
        """List live entries (tombstones are never listed).

        mode 0: the keys; 1: dicts with key, last_access, expire_on and flags,
        and modseq for an entry stored with one; 2: the same plus the decoded
        value.
        """
        entries = self._entries(mode)
        if mode == 0:
            return entries
        fields = ("key", "last_access", "expire_on", "flags", "value")
        n = 5 if mode == 2 else 4
        out = []
        for e in entries:
            d = dict(zip(fields[:n], e[:n]))
            if e[5] is not None:
                d["modseq"] = e[5]
            out.append(d)
        return out

    # ----- mapping protocol -----

    def __iter__(self) -> Iterator[_Key]:
        return iter(self._entries(0))

    def keys(self) -> list[_Key]:
        """A list of the live keys (a snapshot)."""
        return self._entries(0)

    def values(self) -> list[Any]:
        """A list of the live values (a snapshot)."""
        return [e[4] for e in self._entries(2)]

    def items(self) -> list[tuple[_Key, Any]]:
        """A list of (key, value) pairs (a snapshot)."""
        return [(e[0], e[4]) for e in self._entries(2)]

    def pop(self, key: _Key, default: Any = _MISSING) -> Any:
        """Remove key and return its value; default (or KeyError) if absent."""
        value = self.get_and_remove(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise KeyError(key)
            return default
        return value

    def popitem(self) -> tuple[_Key, Any]:
        """Remove and return some (key, value) pair; KeyError if empty."""
        for key in self._entries(0):
            value = self.get_and_remove(key, _MISSING)
            if value is not _MISSING:
                return key, value
        raise KeyError("popitem(): cache is empty")

    def setdefault(self, key: _Key, default: Any = None) -> Any:
        """Return the value of key, storing default first if it is absent (atomically).

        Over a tombstone (modseq) the store is refused, as for
        ``cache[key] = default``: default is returned and the key stays absent.
        """
        # get() first, for read_cb to answer a miss as it would there.  The
        # check and the store then run under one page lock: a loop of get()
        # and add() retries never ends on a key that reads as absent but
        # refuses stores (a tombstone).
        value = self.get(key, _MISSING)
        if value is not _MISSING:
            return value
        with self.lock(key) as entry:
            value = entry._get(key, None, _MISSING)
            if value is _MISSING:
                entry._set(key, None, default)
                value = default
        return value

    def update(
        self, other: Mapping[_KeyT, Any] | Iterable[tuple[_Key, Any]] = (), /, **kwargs: Any
    ) -> None:
        """Store every item of other (a mapping or pairs) and of kwargs."""
        # (the ignore: mypy cannot tell that hasattr() leaves only the mapping)
        pairs = [(k, other[k]) for k in other.keys()] if hasattr(other, "keys") else other  # type: ignore[index]
        for key, value in pairs:
            self[key] = value
        for key, value in kwargs.items():
            self[key] = value

    def memoize(
        self, expire_time: _ExpireTime | None = None, key: Callable[..., str] | None = None, **kw: Any
    ) -> Any:
        """Decorator: cache a function's results in this cache, for every process.

        ``@cache.memoize(expire_time="10m")`` works on functions, ``async``
        functions and methods (above or below ``@staticmethod`` and
        ``@classmethod``).  Calls are keyed by the function's
        ``module.qualname`` and a hash of its normalised arguments, or by
        ``key(*args, **kwargs)`` (a str).  ``None`` results are cached too.
        On a miss one caller computes while the others wait for its result
        (``stampede_timeout=60`` seconds at most; 0 turns this off).  The
        wrapper keeps ``__wrapped__`` and the signature, and has
        ``cache_clear()`` (forgets this function's results, O(1)) and
        ``cache_key(*args, **kwargs)``.  ``namespace=`` replaces
        ``module.qualname`` in the keys.
        """
        # Imported here, not with the package: _memoize needs pickle,
        # datetime and more, which a cache that never memoizes never loads.
        from . import _memoize

        return _memoize.memoize(self, expire_time=expire_time, key=key, **kw)


MutableMapping.register(Cache)


class _Held(_C.PageLock):
    """A page lock held for a with block; callbacks deferred to the exit.

    __enter__ and __exit__ are PageLock's, in C: the page is locked and
    recorded as held in one C call, and unlocked in one, so a signal
    handler raising at any point cannot leave the page locked with nothing
    to unlock it (see PageLock in csrc/_fastmmapmodule.c).
    """

    def __init__(self, cache: Cache, lock_key: _Key, page_key: _Key | None) -> None:
        super().__init__(cache, lock_key)
        self._cache = cache
        self._page_key = page_key
        # ("write", key, value, expire_on) / ("delete", key) / ("evicted", list)
        self._pending: list[tuple[Any, ...]] = []

    def _after_exit(self, released: bool) -> None:
        # Called by PageLock.__exit__ once the page is unlocked; released is
        # False in a child forked inside the block, where the page lock (and
        # the callbacks queued before the fork) stay with the parent.
        pending, self._pending = self._pending, []
        if released:
            self._run_callbacks(pending)

    def _run_callbacks(self, pending: list[tuple[Any, ...]]) -> None:
        cache = self._cache
        first_error: BaseException | None = None
        for action in pending:
            try:
                if action[0] == "evicted":
                    cache._flush_evicted(action[1])
                elif action[0] == "write":  # queued only when _write_cb is set
                    cache._write_cb(cache._context, action[1], action[2], action[3])  # type: ignore[misc]
                else:  # queued only when _delete_cb is set
                    cache._delete_cb(cache._context, action[1])  # type: ignore[misc]
            except BaseException as e:  # run them all, report the first
                if first_error is None:
                    first_error = e
        if first_error is not None:
            raise first_error

    def _check(self) -> int:
        page = self._page
        if page is None:
            if self._cache.closed:
                raise ValueError("I/O operation on closed cache")
            raise Error("use this object inside its with block")
        return page

    def _get(self, key: _Key, page_key: _Key | None, default: Any) -> Any:
        return self._cache._held_get(self._check(), key, page_key, default)

    def _set(
        self, key: _Key, page_key: _Key | None, value: Any, expire_time: _ExpireTime | None = None
    ) -> None:
        page = self._check()
        # stored: True; too big: False; refused by a tombstone (modseq rules): None
        stored, expire_on, evicted = self._cache._held_set(page, key, page_key, value, expire_time)
        c = self._cache
        if evicted:
            self._pending.append(("evicted", evicted))
        if stored is None:
            return  # the key stays absent, as after cache.set() returning False
        if page_key is None and c._write_cb is not None and (not c._write_back or not stored):
            self._pending.append(("write", key, value, expire_on))
        if not stored:
            raise ItemTooLargeError(f"item for key {key!r} does not fit in a page")

    def _delete(self, key: _Key, page_key: _Key | None) -> bool:
        existed = self._cache._held_delete(self._check(), key, page_key)
        if page_key is None and self._cache._delete_cb is not None:
            self._pending.append(("delete", key))
        return existed


class LockedEntry(_Held):
    """One key with its page locked: see Cache.lock()."""

    def __init__(self, cache: Cache, key: _Key) -> None:
        super().__init__(cache, key, None)
        self.key = key

    @property
    def value(self) -> Any:
        """The current value (None if absent); assign to store, del to remove."""
        return self._get(self.key, None, None)

    @value.setter
    def value(self, value: Any) -> None:
        self._set(self.key, None, value)

    @value.deleter
    def value(self) -> None:
        self._delete(self.key, None)

    @property
    def exists(self) -> bool:
        """True if the key is present and not expired."""
        return self._get(self.key, None, _MISSING) is not _MISSING

    def set(self, value: Any, expire_time: _ExpireTime | None = None) -> None:
        """Store value with an optional expire_time."""
        self._set(self.key, None, value, expire_time)

    def remove(self) -> bool:
        """Delete the key; return True if it was present."""
        return self._delete(self.key, None)


class LockedPage(_Held):
    """One page locked for a batch: see Cache.page()."""

    def __init__(self, cache: Cache, page_key: _Key) -> None:
        super().__init__(cache, page_key, page_key)

    def __getitem__(self, key: _Key) -> Any:
        value = self._get(key, self._page_key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def get(self, key: _Key, default: Any = None) -> Any:
        return self._get(key, self._page_key, default)

    def __setitem__(self, key: _Key, value: Any) -> None:
        self._set(key, self._page_key, value)

    def set(self, key: _Key, value: Any, expire_time: _ExpireTime | None = None) -> None:
        self._set(key, self._page_key, value, expire_time)

    def __delitem__(self, key: _Key) -> None:
        if not self._delete(key, self._page_key):
            raise KeyError(key)

    def __contains__(self, key: _Key) -> bool:
        return self._get(key, self._page_key, _MISSING) is not _MISSING


class Share(_C.PageLock):
    """One picklable object in anonymous shared memory (IPC::Mmap::Share).

    Visible to this process and every child it forks afterwards.  No file
    is created.  ``size`` bounds the pickled size of the object.  lock() is
    re-entrant within a thread; other threads and processes wait.
    ``with share:`` locks and unlocks in C (PageLock), so a signal cannot
    leave the lock held.
    """

    _KEY = b"\x00share"

    def __init__(self, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"size must be a positive int, got {size!r}")
        page = 1 << max(10, (size + 512).bit_length())
        self._size = size
        self._cache = Cache(anonymous=True, num_pages=1, page_size=page, start_slots=4)
        super().__init__(self._cache, self._KEY, True)

    @property
    def size(self) -> int:
        return self._size

    def set(self, obj: Any) -> None:
        """Store obj; ValueError (old value kept) if it needs more than size bytes.

        bytes and str are stored as they are (str as UTF-8); other objects
        are pickled.
        """
        if isinstance(obj, bytes):
            n = len(obj)
        elif isinstance(obj, str):
            n = len(obj.encode("utf-8", "surrogatepass"))
        else:
            import pickle  # only here: `import fastmmap` does not load it

            n = len(pickle.dumps(obj, pickle.HIGHEST_PROTOCOL))
        if n > self._size:
            raise ValueError(f"object needs {n} bytes, more than this Share's size of {self._size}")
        page = self._page
        if page is not None and self._held():
            self._cache._held_set(page, self._KEY, None, obj, None)
        else:
            self._cache.set(self._KEY, obj)

    def get(self) -> Any:
        """Return the stored object (None if nothing was stored)."""
        page = self._page
        if page is not None and self._held():
            return self._cache._held_get(page, self._KEY, None, None)
        return self._cache.get(self._KEY)

    def lock(self) -> None:
        """Lock the shared object (re-entrant within one thread)."""
        self._acquire()  # waits for other holders

    def unlock(self) -> None:
        """Undo one lock().  In a child forked while the lock was held, this
        forgets the inherited lock; the lock itself stays with the parent."""
        self._release()

    def close(self) -> None:
        self._cache.close()
