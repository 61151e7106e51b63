"""A typed tour of fastmmap's public API.

fastmmap ships type information (py.typed, and a stub for the C
extension), so a type checker sees keys as ``str | bytes``, results such as
``set() -> bool`` and ``get_statistics() -> tuple[int, int]``, and values as
``Any`` (a cache holds whatever its serializer accepts).

tests/test_typing.py checks this file with ``mypy --strict`` against the
installed package, then runs it.  The ``assert_type`` calls pin the types
the checker infers (they do nothing at run time), and each
``# type: ignore[...]`` marks a call that the checker must reject (``mypy
--strict`` reports an ignore that is not needed).

    python examples/typed_usage.py
"""

from __future__ import annotations

import contextlib
import datetime
import json
import pathlib
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any, assert_type

import fastmmap

# ---------------------------------------------------------------- helpers

#: A dict stands in for the slow backing store behind a read/write-through cache.
Store = dict[str | bytes, Any]


def read_cb(store: Store, key: str | bytes) -> Any:
    """On a miss: the value from the store; None means "not found"."""
    return store.get(key)


def write_cb(store: Store, key: str | bytes, value: Any, expire_on: float) -> None:
    store[key] = value


def delete_cb(store: Store, key: str | bytes) -> None:
    store.pop(key, None)


def json_dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


def json_loads(data: bytes) -> Any:
    return json.loads(data)


def increment(key: str | bytes, old: int | None) -> int:
    return (old or 0) + 1


@contextlib.contextmanager
def raises(exc_type: type[BaseException]) -> Iterator[None]:
    """Check that the block raises exc_type."""
    try:
        yield
    except exc_type:
        return
    raise AssertionError(f"{exc_type.__name__} not raised")


# ---------------------------------------------------------------- the basics


def basics(path: pathlib.Path) -> None:
    # share_file may be a str, bytes or os.PathLike; sizes and times may be
    # ints or strings.
    with fastmmap.Cache(
        path,
        init_file=True,
        cache_size="1m",
        expire_time="1h",
        enable_stats=True,
        lock_timeout=5.0,
        compressor="zlib",
        compress_threshold=256,
    ) as cache:
        assert_type(cache, fastmmap.Cache)

        # get / set / [] / in / del / len / iteration
        assert_type(cache.set("user:1", {"name": "Ada"}), bool)
        cache["user:2"] = {"name": "Grace"}
        cache[b"blob"] = bytes(range(16))
        assert cache.get("user:1") == {"name": "Ada"}
        assert cache.get("user:9", "absent") == "absent"
        assert cache["user:2"]["name"] == "Grace"
        assert "user:1" in cache and b"blob" in cache
        del cache["user:2"]
        assert_type(len(cache), int)
        assert len(cache) == 2
        assert_type(iter(cache), Iterator[str | bytes])
        assert set(cache) == {"user:1", b"blob"}
        assert_type(cache.keys(), list[str | bytes])
        assert_type(cache.items(), list[tuple[str | bytes, Any]])
        assert dict(cache.items())[b"blob"] == bytes(range(16))

        # expiry: relative (seconds, strings, timedelta) or absolute
        assert cache.set("a", 1, 30)
        assert cache.set("b", 2, "5m")
        assert cache.set("c", 3, expire_time=datetime.timedelta(days=1))
        assert cache.set("d", 4, expire_on=int(time.time()) + 60)
        assert cache.set("e", 5, "never")
        assert_type(cache.touch("a", "2h"), bool)
        assert not cache.touch("no such key")

        # atomic updates
        assert_type(cache.add("once", 1), bool)
        assert not cache.add("once", 2)
        hits = cache.get_and_set("hits", increment)
        assert_type(hits, int)
        assert cache.get_and_set("hits", increment) == 2
        assert cache.get_and_set("x", lambda key, old: f"{key}={old}") == "x=None"
        # no store, an expiry from the function, the entry's state, did it store
        assert cache.get_and_set("x", lambda key, old: fastmmap.NO_CHANGE) == "x=None"
        bumped = cache.get_and_set(
            "n", lambda key, e: fastmmap.Update(e.value + 1, keep_expiry=e.exists), entry=True, default=0
        )
        assert bumped == 1
        value, stored = cache.get_and_set("n", lambda key, old: fastmmap.Update(old + 1, expire_time="1h"), with_stored=True)
        assert_type(stored, bool)
        assert (value, stored) == (2, True)
        assert cache.get_and_remove("once") == 1
        assert_type(cache.exists("once"), bool)
        assert_type(cache.remove("hits"), bool)
        cache.expire("a")

        # several keys in one page, under one lock
        cache.multi_set("user:3", {"name": "Linus", "visits": 0}, expire_time="1d")
        found = cache.multi_get("user:3", ["name", "visits", "email"])
        assert_type(found, dict[str, Any])
        assert found == {"name": "Linus", "visits": 0}

        # lock blocks
        with cache.lock("counter") as entry:
            assert_type(entry, fastmmap.LockedEntry)
            entry.value = (entry.value or 0) + 1
            assert entry.exists
        with cache.page("user:3") as page:
            assert_type(page, fastmmap.LockedPage)
            page["visits"] = page["visits"] + 1
            page.set("email", "linus@example.org", expire_time=60)
            assert "email" in page
        assert cache.multi_get("user:3", ["visits"]) == {"visits": 1}

        # dict-style helpers
        assert cache.setdefault("lang", "en") == "en"
        cache.update({"k1": 1}, k2=2)
        cache.update([("k3", 3)])
        assert cache.pop("k3") == 3
        assert cache.pop("k3", None) is None

        # the file and its counters
        assert_type(cache.share_file, str | None)
        assert_type(cache.expire_time, float)  # seconds, with milliseconds
        assert cache.expire_time == 3600
        assert_type(cache.page_size, int)
        assert cache.cache_size == cache.page_size * cache.num_pages
        assert_type(cache.max_item_size, int)
        assert_type(cache.get_statistics(), tuple[int, int])
        assert_type(cache.check(), list[str])
        assert cache.check() == []
        assert_type(cache.repaired_pages(), int)
        for info in cache.get_keys(1):
            assert info["expire_on"] >= 0
        cache.purge()
        cache.empty(only_expired=True)
        cache.clear()
        assert len(cache) == 0

        # What the types rule out (and the run time refuses as well).
        with raises(TypeError):
            cache.set(42, "x")  # type: ignore[arg-type]  # keys are str or bytes
    assert cache.closed


# ---------------------------------------------------------------- options


def callbacks_and_serializers() -> None:
    store: Store = {"user:1": {"name": "alice"}}
    cache = fastmmap.Cache(
        anonymous=True,
        num_pages=3,
        page_size="64k",
        context=store,
        read_cb=read_cb,
        write_cb=write_cb,
        delete_cb=delete_cb,
        serializer=(json_dumps, json_loads),
    )
    try:
        assert cache.share_file is None
        assert cache.get("user:1") == {"name": "alice"}  # read through
        cache["user:2"] = {"name": "bob"}  # written through
        assert store["user:2"] == {"name": "bob"}
        del cache["user:1"]
        assert "user:1" not in store
    finally:
        cache.close()

    # Built-in serializers and compressors are named by literal strings.
    with fastmmap.Cache(serializer="json", compressor=None, write_action="write_back") as c:
        c["n"] = [1, 2, 3]
        assert c["n"] == [1, 2, 3]
    with raises(ValueError):
        fastmmap.Cache(serializer="yaml")  # type: ignore[arg-type]  # not a serializer


def share() -> None:
    shared = fastmmap.Share(4096)
    try:
        assert_type(shared.size, int)
        shared.set({"done": 0})
        with shared:  # read-modify-write under the lock (forked children too)
            state = shared.get()
            state["done"] += 1
            shared.set(state)
        assert shared.get() == {"done": 1}
    finally:
        shared.close()


# ---------------------------------------------------------------- exceptions


def exceptions(directory: pathlib.Path) -> None:
    path = directory / "errors.cache"
    with fastmmap.Cache(path, page_size="64k", num_pages=3, lock_timeout=0.2) as cache:
        # A file opened with sizes that disagree with it.
        try:
            fastmmap.Cache(path, page_size="8k")
        except fastmmap.GeometryError as e:
            assert isinstance(e, ValueError)  # GeometryError is also a ValueError
        else:
            raise AssertionError("GeometryError not raised")

        # Using the cache from inside one of its own lock blocks, or a
        # LockedEntry outside its block.
        with cache.lock("k") as entry:
            with raises(fastmmap.RecursiveLockError):
                cache.get("k")
        with raises(fastmmap.Error):
            entry.value = 1

        # Waiting longer than lock_timeout for a page another thread holds.
        errors: list[BaseException] = []

        def contend() -> None:
            try:
                cache.get("k")
            except fastmmap.LockTimeout as e:
                errors.append(e)

        with cache.lock("k"):
            worker = threading.Thread(target=contend)
            worker.start()
            worker.join()
        assert len(errors) == 1 and isinstance(errors[0], TimeoutError)

        # An item that can never fit in a page.
        too_big = b"x" * (cache.max_item_size + 1)
        assert not cache.set("big", too_big)
        with raises(ValueError):
            cache["big"] = too_big

    # A file that is not a cache.
    junk = directory / "junk"
    junk.write_bytes(b"not a cache" * 1000)
    with raises(fastmmap.BadFileError):
        fastmmap.Cache(junk)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="fastmmap-typed-") as tmp:
        directory = pathlib.Path(tmp)
        basics(directory / "basics.cache")
        callbacks_and_serializers()
        share()
        exceptions(directory)
    print("typed_usage: OK")


if __name__ == "__main__":
    main()
