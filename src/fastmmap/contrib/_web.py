"""What the Django and cachelib backends share: their default size, and
values too large for a page.

With no size option, a backend's file is made with ``cache_size="64m"``,
which gives 2 MiB pages: rendered pages and API responses fit (fastmmap's
own default, 89 pages of 64 KiB, holds items of about 64 KiB).  An
existing file keeps its geometry.

A framework cache that cannot hold a value stores nothing, and the page or
fragment is simply recomputed on every request: correct, but easy to miss.
The backends call ``report()`` instead, which logs a warning on the
``fastmmap.contrib`` logger once per cache file and size class (the power
of two at or above the value's pickled size: a flood of 150 KiB pages logs
once, a later 3 MiB value once more), or raises ``ItemTooLargeError`` when
the application runs in debug mode, where the developer should see it.
"""

from __future__ import annotations

import logging
import pickle
import threading
from typing import Any

import fastmmap

__all__ = ["open_cache", "report"]

#: cache_size of a backend's file when its options give no size.
DEFAULT_CACHE_SIZE = "64m"
_SIZE_OPTIONS = ("cache_size", "page_size", "num_pages")

logger = logging.getLogger("fastmmap.contrib")

_reported: set[tuple[str | None, int]] = set()
_lock = threading.Lock()


def open_cache(path: str, options: dict[str, Any]) -> fastmmap.Cache:
    """fastmmap.Cache(path, **options), DEFAULT_CACHE_SIZE if no size is given."""
    if any(options.get(name) is not None for name in _SIZE_OPTIONS):
        return fastmmap.Cache(path, **options)
    try:
        return fastmmap.Cache(path, **{**options, "cache_size": DEFAULT_CACHE_SIZE})
    except fastmmap.GeometryError:
        return fastmmap.Cache(path, **options)  # an existing file of another size: adopt it


def _pickled_size(value: Any) -> int:
    """The value's size as pickle stores it: an estimate of what the cache
    stored (it may have used another serializer or compressed)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    try:
        return len(pickle.dumps(value, pickle.HIGHEST_PROTOCOL))
    except Exception:  # the cache's own serializer took it; pickle need not
        return 0


def report(cache: fastmmap.Cache, key: str, value: Any, *, debug: bool) -> None:
    """A store of ``value`` under ``key`` was refused as too large."""
    size = _pickled_size(value)
    message = (
        f"fastmmap: the value for key {key!r} (about {size} bytes) does not fit in a page "
        f"of {cache.share_file} (items of at most {cache.max_item_size} bytes) and was not cached; "
        "raise the page_size option (caches of 64 MiB and more given by cache_size alone have "
        "2 MiB pages)"
    )
    if debug:
        raise fastmmap.ItemTooLargeError(message)
    size_class = 1 << max(size - 1, 0).bit_length()
    with _lock:
        if (cache.share_file, size_class) in _reported:
            return
        _reported.add((cache.share_file, size_class))
    logger.warning("%s; reported once per size class (up to %d bytes)", message, size_class)
