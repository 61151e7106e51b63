"""Type stub of fastmmap._fastmmap, the C core of fastmmap.

Keep it in step with csrc/_fastmmapmodule.c: tests/test_typing.py runs
stubtest, which compares these signatures with the C methods' signature
docstrings (names, positional-only markers and defaults) and the constants'
values with the module's.

The names starting with an underscore and not defined by the C module
(_Key, _ExpireTime, ...) exist only for type checkers; fastmmap's Python
modules import them under ``if TYPE_CHECKING:``.
"""

import datetime
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Literal, Self, TypeAlias, TypeVar, overload

from _typeshed import ReadableBuffer, StrOrBytesPath
from typing_extensions import disjoint_base

from fastmmap._update import Entry, Update, _NoChangeType

# ---------------------------------------------------------------- aliases

#: A cache key: str (stored as UTF-8) or bytes.
_Key: TypeAlias = str | bytes
_KeyT = TypeVar("_KeyT", bound=str | bytes)
_T = TypeVar("_T")

#: A relative expiry: seconds (int or float, rounded up to the millisecond;
#: to the second with format="perl"), a timedelta, or a
#: string such as "30s", "5m", "2h", "1d", "1w", "never" or "now".
_ExpireTime: TypeAlias = float | str | datetime.timedelta
#: An absolute expiry in unix seconds (0 = never).
_ExpireOn: TypeAlias = float

#: read_cb(context, key) -> value, or None for "not found".
_ReadCallback: TypeAlias = Callable[[Any, _Key], Any]
#: write_cb(context, key, value, expire_on); the result is ignored.
_WriteCallback: TypeAlias = Callable[[Any, _Key, Any, float], object]
#: delete_cb(context, key); the result is ignored.
_DeleteCallback: TypeAlias = Callable[[Any, _Key], object]

#: A value serializer (may return str, stored as UTF-8) and its inverse.
_Dumps: TypeAlias = Callable[[Any], bytes | str]
_Loads: TypeAlias = Callable[[bytes], Any]
#: A compressor or decompressor.
_Codec: TypeAlias = Callable[[bytes], bytes]

#: A dirty entry dropped by the engine in write-back mode:
#: (key, stored value bytes, flags, expire_on).
_Evicted: TypeAlias = tuple[_Key, bytes, int, int]

# ---------------------------------------------------------------- constants

# Value type codes (the low bits of an entry's flags).
T_BYTES: Final = 0
T_STR: Final = 1
T_NONE: Final = 2
T_PICKLE: Final = 3
T_JSON: Final = 4
T_CUSTOM: Final = 5
#: ser_type of serializer="raw" (never stored in an entry).
SER_RAW: Final = 255

# Compression codes (or'ed into an entry's flags).
C_NONE: Final = 0
C_ZLIB: Final = 8
C_LZ4: Final = 16
C_CUSTOM: Final = 24

#: A tombstone's type code (with F_MODSEQ); never seen by get_keys().
T_TOMBSTONE: Final = 6

# Entry flags.
F_DIRTY: Final = 32
F_KEYSTR: Final = 64
#: The entry carries a modseq.
F_MODSEQ: Final = 128

#: default_expire meaning "expire at once".
EXPIRE_NOW: Final = -1
MAX_KEY_LEN: Final = 16777215
MIN_PAGE_SIZE: Final = 1024
MAX_PAGE_SIZE: Final = 1073741824
MAX_PAGES: Final = 16777216

# ---------------------------------------------------------------- exceptions

class Error(Exception):
    """Base class of fastmmap's own errors."""

class LockTimeout(Error, TimeoutError):
    """A page lock was not obtained within lock_timeout."""

class GeometryError(Error, ValueError):
    """Size options disagree with the existing cache file."""

class BadFileError(Error):
    """The file is not a fastmmap cache, or its header is invalid."""

class RecursiveLockError(Error):
    """This thread already holds a page lock of this cache."""

class FileReplacedError(Error):
    """The cache file was deleted or replaced."""

class ItemTooLargeError(Error, ValueError):
    """An item (key, stored value and entry header) can never fit in one page."""

class UntrustedFileError(Error, PermissionError):
    """An existing cache file (or directory) is owned by another user, or group/others may write it beyond permissions."""
class WriteBackLostError(Error):
    """Write-back failed and dirty values could not be put back in the cache: their keys are in .keys."""

    #: the keys of the lost values (None for one that could not be recorded)
    keys: tuple[str | bytes | None, ...]

# ---------------------------------------------------------------- functions

def xxh64(data: ReadableBuffer, seed: int = 0, /) -> int:
    """XXH64 of a bytes-like object (the engine's hash)."""

def _reap_temps(path: StrOrBytesPath, remove: bool, /) -> list[tuple[str, int]]:
    """The temporary files that dead creators of the cache file at path left (name, size), removed if remove is true."""

def perl_hash(data: ReadableBuffer, /) -> int:
    """Cache::FastMmap's 32-bit hash of a bytes-like object (format='perl'): the page is hash % num_pages, the slot hash // num_pages."""

def _set_result_types(no_change: _NoChangeType, update: type[Update[Any]], entry: type[Entry], /) -> None:
    """Register fastmmap.NO_CHANGE, fastmmap.Update and fastmmap.Entry (done by the package)."""

# ---------------------------------------------------------------- CacheBase

# A C type with its own instance layout: it cannot share a subclass with
# another such type (PEP 800).
@disjoint_base
class CacheBase:
    """The C core of fastmmap.Cache.  Use fastmmap.Cache, not this type."""

    # ----- properties (read-only; all but closed raise ValueError once closed)

    @property
    def closed(self) -> bool: ...
    @property
    def page_size(self) -> int: ...
    @property
    def num_pages(self) -> int: ...
    @property
    def cache_size(self) -> int: ...
    @property
    def max_item_size(self) -> int: ...

    # ----- mapping protocol

    def __getitem__(self, key: _Key, /) -> Any: ...
    def __setitem__(self, key: _Key, value: Any, /) -> None: ...
    def __delitem__(self, key: _Key, /) -> None: ...
    def __contains__(self, key: _Key, /) -> bool: ...
    def __len__(self) -> int: ...

    # ----- public methods

    def get(self, key: _Key, default: Any = None, /) -> Any: ...
    def set(
        self,
        key: _Key,
        value: Any,
        expire_time: _ExpireTime | None = None,
        *,
        expire_on: _ExpireOn | None = None,
        modseq: int | None = None,
    ) -> bool: ...
    def add(
        self,
        key: _Key,
        value: Any,
        expire_time: _ExpireTime | None = None,
        *,
        expire_on: _ExpireOn | None = None,
    ) -> bool: ...
    @overload
    def get_and_set(
        self,
        key: _KeyT,
        fn: Callable[[_KeyT, Any], _T | Update[_T] | _NoChangeType],
        expire_time: _ExpireTime | None = None,
        *,
        expire_on: _ExpireOn | None = None,
        modseq: int | None = None,
        default: Any = None,
        entry: Literal[False] = False,
        with_stored: Literal[False] = False,
    ) -> _T: ...
    @overload
    def get_and_set(
        self,
        key: _KeyT,
        fn: Callable[[_KeyT, Entry], _T | Update[_T] | _NoChangeType],
        expire_time: _ExpireTime | None = None,
        *,
        expire_on: _ExpireOn | None = None,
        modseq: int | None = None,
        default: Any = None,
        entry: Literal[True],
        with_stored: Literal[False] = False,
    ) -> _T: ...
    @overload
    def get_and_set(
        self,
        key: _KeyT,
        fn: Callable[[_KeyT, Any], _T | Update[_T] | _NoChangeType],
        expire_time: _ExpireTime | None = None,
        *,
        expire_on: _ExpireOn | None = None,
        modseq: int | None = None,
        default: Any = None,
        entry: Literal[False] = False,
        with_stored: Literal[True],
    ) -> tuple[_T, bool]: ...
    @overload
    def get_and_set(
        self,
        key: _KeyT,
        fn: Callable[[_KeyT, Entry], _T | Update[_T] | _NoChangeType],
        expire_time: _ExpireTime | None = None,
        *,
        expire_on: _ExpireOn | None = None,
        modseq: int | None = None,
        default: Any = None,
        entry: Literal[True],
        with_stored: Literal[True],
    ) -> tuple[_T, bool]: ...
    def get_and_remove(self, key: _Key, default: Any = None, /) -> Any: ...
    def exists(self, key: _Key, /) -> bool: ...
    def remove(
        self,
        key: _Key,
        /,
        *,
        modseq: int | None = None,
        expire_time: _ExpireTime | None = None,
        expire_on: _ExpireOn | None = None,
    ) -> bool: ...
    def get_modseq(self, key: _Key, /) -> int | None: ...
    def expire(self, key: _Key, /) -> None: ...
    def touch(
        self,
        key: _Key,
        expire_time: _ExpireTime | None = None,
        *,
        expire_on: _ExpireOn | None = None,
    ) -> bool: ...
    def multi_get(self, page_key: _Key, keys: Iterable[_KeyT], /) -> dict[_KeyT, Any]: ...
    def multi_set(
        self,
        page_key: _Key,
        mapping: Mapping[_KeyT, Any] | Iterable[tuple[_KeyT, Any]],
        expire_time: _ExpireTime | None = None,
    ) -> None: ...
    def clear(self) -> None: ...
    def purge(self) -> None: ...
    def empty(self, only_expired: bool = False) -> None: ...
    def get_statistics(self, clear: bool = False) -> tuple[int, int]: ...
    def repaired_pages(self) -> int: ...
    def check(self) -> list[str]: ...
    def close(self) -> None: ...

    # ----- private: called by fastmmap.Cache, LockedEntry, LockedPage, Share and the CLI

    def _open(
        self,
        path: StrOrBytesPath | None,
        page_size: int,
        num_pages: int,
        start_slots: int,
        explicit_geometry: int,
        init_file: bool,
        permissions: int,
        anonymous: bool,
        enable_stats: bool,
        format: int = 0,
        perl_value_flags: int = 0,
        /,
    ) -> bool: ...
    def _configure(
        self,
        default_expire: int,
        lock_timeout: float | None,
        ser_type: int,
        dumps: _Dumps | None,
        loads: _Loads | None,
        comp_type: int,
        compress: _Codec | None,
        decompress: _Codec | None,
        compress_threshold: int,
        parse_expire: Callable[[Any], int] | None,
        tombstone_expire: int | None,
        /,
    ) -> None: ...
    def _set_callbacks(
        self,
        context: Any,
        read_cb: _ReadCallback | None,
        write_cb: _WriteCallback | None,
        delete_cb: _DeleteCallback | None,
        write_back: bool,
        cache_not_found: bool,
        allow_recursive: bool,
        /,
    ) -> None: ...
    # mode 0: the keys; 1: (key, last_access, expire_on, flags, None, modseq or None);
    # 2: the same with the decoded value in place of the None.
    @overload
    def _entries(self, mode: Literal[0] = 0, /) -> list[_Key]: ...
    @overload
    def _entries(self, mode: Literal[1], /) -> list[tuple[_Key, int, int, int, None, int | None]]: ...
    @overload
    def _entries(self, mode: Literal[2], /) -> list[tuple[_Key, int, int, int, Any, int | None]]: ...
    @overload
    def _entries(self, mode: int, /) -> list[Any]: ...
    def _page_info(self, page: int, /) -> dict[str, int]: ...
    def _set_time_override(self, t: float, /) -> None: ...
    def _set_batch_fault(self, k: int, /) -> None: ...
    def _release_locks(self) -> None: ...
    def _held_get(self, page: int, key: _Key, page_key: _Key | None, default: Any, /) -> Any: ...
    def _held_set(
        self,
        page: int,
        key: _Key,
        page_key: _Key | None,
        value: Any,
        expire_time: _ExpireTime | None,
        /,
    ) -> tuple[bool | None, float, list[_Evicted] | None]: ...
    def _held_delete(self, page: int, key: _Key, page_key: _Key | None, /) -> bool: ...
    def _flush_evicted(self, entries: list[_Evicted] | None, /) -> None: ...

# ---------------------------------------------------------------- PageLock

# A C type with its own instance layout, like CacheBase (PEP 800).
@disjoint_base
class PageLock:
    """The lock of key's page, held across calls: the base of LockedEntry, LockedPage
    and Share.  Taken and recorded in one C call, released when its holder leaves
    the with block, when it is garbage-collected, or when the cache is closed."""

    def __init__(self, cache: CacheBase, key: _Key, /, reentrant: bool = False) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> Literal[False]: ...
    def _acquire(self) -> None: ...
    def _release(self) -> None: ...
    def _held(self) -> bool: ...
    @property
    def _page(self) -> int | None:
        """The locked page's number, or None when not held."""
