"""fastmmap.contrib.aiocache.FastMmapCache: aiocache's API on a shared file.

aiocache's own acceptance tests run against it in ``make test-upstream``;
here: the API, atomic increments across processes, aiocache's locks
(RedLock across processes, OptimisticLock's compare-and-set), values too
large for a page, the cached decorator and aiocache's factory, and bad
input.  examples/asgi_counter.py under uvicorn is in test_asgi_counter.py.
"""

from __future__ import annotations

import asyncio
import os

import pytest

pytest.importorskip("aiocache")

from aiocache import Cache, cached  # noqa: E402
from aiocache.lock import OptimisticLock, OptimisticLockError, RedLock  # noqa: E402
from aiocache.serializers import JsonSerializer  # noqa: E402

import fastmmap  # noqa: E402
from fastmmap.contrib.aiocache import FastMmapCache  # noqa: E402

run = asyncio.run


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "aio.cache")


def test_api(path):
    async def main():
        c = FastMmapCache(path, cache_size="1m", namespace="ns:")
        assert await c.get("k") is None and await c.get("k", default=3) == 3
        assert await c.set("k", {"a": (1, 2)})
        assert await c.get("k") == {"a": (1, 2)} and await c.exists("k")
        assert await c.multi_set([("x", 1), ("y", "two")])
        assert await c.multi_get(["x", "y", "z"]) == [1, "two", None]
        assert await c.add("new", 1)
        with pytest.raises(ValueError, match="already exists"):
            await c.add("new", 2)
        assert await c.increment("n") == 1 and await c.increment("n", 5) == 6
        await c.set("s", "text")
        with pytest.raises(TypeError, match="not an integer"):
            await c.increment("s")
        assert await c.expire("k", 60) and not await c.expire("missing", 60)
        assert await c.delete("k") == 1 and await c.delete("k") == 0
        assert await c.raw("get", "ns:x") == 1
        # the entries are the namespace's keys in the file
        raw = fastmmap.Cache(path)
        assert raw.get("ns:x") == 1
        raw.set("other:x", "kept")
        assert await c.clear(namespace="ns:")
        assert await c.get("x") is None and raw.get("other:x") == "kept"
        await c.close()  # closes nothing: the cache still works
        assert await c.set("x", 2) and await c.get("x") == 2
        raw.close()

    run(main())


def test_ttl_and_expire(path):
    async def main():
        c = FastMmapCache(path, cache_size="1m")
        await c.set("k", "v", ttl=60)
        raw = fastmmap.Cache(path)
        (entry,) = raw.get_keys(1)
        assert entry["expire_on"] > 0  # expires
        await c.expire("k", 0)  # aiocache: 0 removes the expiry
        (entry,) = raw.get_keys(1)
        assert entry["expire_on"] == 0
        await c.set("never", "v")
        assert [e["expire_on"] for e in raw.get_keys(1) if e["key"] == "never"] == [0]
        raw.close()

    run(main())


def test_increment_is_atomic_across_processes(path, forked):
    c = FastMmapCache(path, cache_size="1m")

    def child():
        async def main():
            for _ in range(300):
                await c.increment("hits")

        run(main())

    children = [forked.start(child) for _ in range(4)]
    for ch in children:
        ch.result()
    assert run(c.get("hits")) == 1200


def test_locks(path, forked):
    c = FastMmapCache(path, cache_size="1m")
    held_r, held_w = os.pipe()
    go_r, go_w = os.pipe()

    def holder():
        async def main():
            async with RedLock(c, "job", lease=60):
                os.write(held_w, b"h")
                os.read(go_r, 1)

        run(main())

    child = forked.start(holder)
    os.read(held_r, 1)

    async def blocked():
        # held by the other process: add() of the lock key fails here
        assert await c.exists("job-lock")
        with pytest.raises(ValueError, match="already exists"):
            await c.add("job-lock", "mine")
        # release only by the owner: another value does not release it
        assert await c._redlock_release("job-lock", "not-the-owner") == 0
        assert await c.exists("job-lock")

    run(blocked())
    os.write(go_w, b"g")
    child.result()
    assert not run(c.exists("job-lock"))

    async def optimistic():
        await c.set("doc", "v1")
        async with OptimisticLock(c, "doc") as lock:
            await lock.cas("v2")
        assert await c.get("doc") == "v2"
        with pytest.raises(OptimisticLockError):
            async with OptimisticLock(c, "doc") as lock:
                await c.set("doc", "changed meanwhile")
                await lock.cas("v3")
        assert await c.get("doc") == "changed meanwhile"

    run(optimistic())


def test_value_too_large_for_a_page(tmp_path):
    async def main():
        c = FastMmapCache(str(tmp_path / "small.cache"), page_size="64k", num_pages=3)
        await c.set("k", "small")
        assert not await c.set("k", b"x" * 100_000)
        assert await c.get("k") is None  # the old value is not left in its place
        await c.multi_set([("a", 1), ("b", b"y" * 100_000)])  # aiocache returns True whatever happens
        assert await c.get("a") == 1 and await c.get("b") is None

    run(main())


def test_cached_decorator_factory_and_serializer(path, forked):
    calls = []

    @cached(cache=FastMmapCache, share_file=path, cache_size="1m", namespace="sq:", ttl=60)
    async def square(n):
        calls.append(n)
        return {"square": n * n, "pid": os.getpid()}

    def child():
        return run(square(9)), list(calls)

    value, child_calls = forked(child)
    assert child_calls == [9] and value["pid"] != os.getpid()
    assert run(square(9)) == value and calls == []  # computed in the child

    # aiocache's factory, and an aiocache serializer on top of fastmmap's
    c = Cache(FastMmapCache, share_file=path, cache_size="1m", serializer=JsonSerializer(), namespace="j:")
    run(c.set("t", (1, 2)))
    assert run(c.get("t")) == [1, 2]  # through JSON
    with fastmmap.Cache(path) as raw:
        assert raw.get("j:t") == "[1, 2]"
    assert FastMmapCache.parse_uri_path("/dev/shm/x.cache") == {"share_file": "/dev/shm/x.cache"}


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="share_file"):
        FastMmapCache()
    with pytest.raises(TypeError, match="cache_szie"):
        FastMmapCache(str(tmp_path / "x.cache"), cache_szie="1m")
    assert not (tmp_path / "x.cache").exists()
