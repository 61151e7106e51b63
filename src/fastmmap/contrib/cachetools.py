"""A cachetools-compatible mapping in a fastmmap file, shared by processes.

``cachetools.cached`` and ``cachetools.cachedmethod`` take any mutable
mapping as their cache; this one stores its entries in a fastmmap file, so
that every process that opens the file shares the results::

    import cachetools
    from fastmmap.contrib.cachetools import SharedCache

    shared = SharedCache("/dev/shm/app.cache", cache_size="64m", expire_time="10m")

    @cachetools.cached(cache=shared)
    def fib(n): ...

cachetools makes keys with ``cachetools.keys.hashkey``: tuples of the
arguments, which a plain ``fastmmap.Cache`` does not take (its keys are
str or bytes).  SharedCache turns any picklable key into a str key: a
namespace, then a blake2b hash of the key's canonical pickle (dicts and
sets sorted), so equal arguments give the same key in every process,
whatever its hash seed.  The entry holds the original key beside the value,
so ``keys()`` and ``items()`` give the original keys back, and two keys with
the same hash can never be confused.

A value too large for a page raises ``ValueError``, as cachetools' own
caches do for a value larger than ``maxsize``: ``cached`` then returns the
value without caching it.  The key's old value is removed first.
Eviction is fastmmap's (per page, least recently used) and expiry its
``expire_time``; there is no ``maxsize``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, MutableMapping
from typing import Any

import fastmmap
from fastmmap import _memoize

__all__ = ["SharedCache"]

_MISSING = object()
#: Default namespace: what comes before the hash in every key.
DEFAULT_NAMESPACE = "fmm.cachetools:"


def _numbers_as_dict_keys(obj: Any) -> Any:
    """Keys that are equal as dict keys pickle alike: 1, 1.0 and True.

    cachetools' hashkey(1) == hashkey(1.0), so a dict finds either under
    the other; typedkey keeps them apart by adding the types.  Tuples
    (cachetools' _HashedTuple too) become plain tuples.
    """
    t = type(obj)
    if t is bool:
        return int(obj)
    if t is float and obj.is_integer():
        return int(obj)
    if isinstance(obj, tuple):
        return tuple(_numbers_as_dict_keys(x) for x in obj)
    return obj


class SharedCache(MutableMapping[Any, Any]):
    """A mutable mapping in a fastmmap file, for cachetools' decorators.

    :param cache: a :class:`fastmmap.Cache` (with the pickle serializer,
        the default), or the path of a cache file to open with ``options``.
    :param namespace: prefix of this mapping's keys in the file.  Mappings
        with different namespaces share the file but not their entries;
        ``clear()`` removes only this namespace's entries.
    :param options: :class:`fastmmap.Cache` options, when ``cache`` is a
        path (``unlink_on_exit`` then defaults to False).
    """

    def __init__(self, cache: fastmmap.Cache | str | os.PathLike[str], *, namespace: str = DEFAULT_NAMESPACE,
                 **options: Any) -> None:
        if not isinstance(namespace, str) or not namespace:
            raise ValueError(f"namespace must be a non-empty str, got {namespace!r}")
        if isinstance(cache, fastmmap.Cache):
            if options:
                raise TypeError("pass fastmmap.Cache options only with a path, not with an open cache")
            serializer = cache._reopen_options.get("serializer")
        elif isinstance(cache, (str, os.PathLike)):
            options.setdefault("unlink_on_exit", False)
            serializer = options.get("serializer", "pickle")
            if serializer == "pickle":
                cache = fastmmap.Cache(cache, **options)
        else:
            raise TypeError(f"cache must be a fastmmap.Cache or a path, not {type(cache).__name__}")
        if serializer != "pickle":
            # entries are (key, value) tuples: other serializers do not
            # give tuples (or arbitrary keys) back
            raise ValueError(f"SharedCache needs a cache with serializer='pickle', not {serializer!r}")
        assert isinstance(cache, fastmmap.Cache)
        self.cache = cache
        self.namespace = namespace

    def key_for(self, key: Any) -> str:
        """The fastmmap key under which ``key`` is stored."""
        try:
            data = _memoize._dumps(_memoize._canon(_numbers_as_dict_keys(key)))
        except Exception as e:
            raise TypeError(f"SharedCache keys must be picklable: {key!r} is not ({e})") from None
        return self.namespace + hashlib.blake2b(data, digest_size=20).hexdigest()

    def __getitem__(self, key: Any) -> Any:
        entry = self.cache.get(self.key_for(key), _MISSING)
        if entry is _MISSING or entry[0] != key:
            raise KeyError(key)
        return entry[1]

    def get(self, key: Any, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __setitem__(self, key: Any, value: Any) -> None:
        fkey = self.key_for(key)
        if not self.cache.set(fkey, (key, value)):
            self.cache.remove(fkey)  # do not leave the old value in its place
            raise ValueError("value too large for a page of the cache")

    def __delitem__(self, key: Any) -> None:
        fkey = self.key_for(key)
        entry = self.cache.get_and_remove(fkey, _MISSING)
        if entry is _MISSING:
            raise KeyError(key)

    def __contains__(self, key: Any) -> bool:
        try:
            self[key]
        except KeyError:
            return False
        return True

    def _own_keys(self) -> list[str]:
        ns = self.namespace
        return [k for k in self.cache.keys() if isinstance(k, str) and k.startswith(ns)]

    def __iter__(self) -> Iterator[Any]:
        """The original keys of this namespace's live entries (a snapshot)."""
        for fkey in self._own_keys():
            entry = self.cache.get(fkey, _MISSING)
            if entry is not _MISSING:
                yield entry[0]

    def __len__(self) -> int:
        return len(self._own_keys())

    def clear(self) -> None:
        """Remove this namespace's entries (one by one: not atomic)."""
        for fkey in self._own_keys():
            self.cache.remove(fkey)

    def __repr__(self) -> str:
        return f"<fastmmap.contrib.cachetools.SharedCache {self.namespace!r} in {self.cache!r}>"
