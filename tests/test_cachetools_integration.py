"""cachetools' decorators on fastmmap: SharedCache, and a plain fastmmap.Cache.

cachetools' own decorator tests run against SharedCache in
``make test-upstream``; here: results shared across processes (cached and
cachedmethod), keys that do not depend on the process's hash seed, values
too large for a page, the mapping protocol and bad input.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest

cachetools = pytest.importorskip("cachetools")

import fastmmap  # noqa: E402
from fastmmap.contrib.cachetools import SharedCache  # noqa: E402


@pytest.fixture
def shared(tmp_path):
    cache = SharedCache(str(tmp_path / "ct.cache"), cache_size="1m")
    yield cache
    cache.cache.close()


def test_cached_shares_results_across_processes(shared, forked):
    calls = []

    @cachetools.cached(cache=shared)
    def square(x, *, scale=1):
        calls.append(os.getpid())
        return {"square": x * x * scale, "pid": os.getpid()}

    def child():
        return square(7), square(3, scale=2), list(calls)

    first, scaled, child_calls = forked(child)
    assert len(child_calls) == 2 and calls == []
    # computed in the child, read here without calling the function
    assert square(7) == first and square(3, scale=2) == scaled
    assert calls == [] and first["pid"] != os.getpid()
    assert square(7.0) == first  # hashkey(7) == hashkey(7.0), as in a dict
    assert square(8)["pid"] == os.getpid() and len(calls) == 1
    assert len(shared) == 3
    square.cache_clear()
    assert len(shared) == 0


def test_cachedmethod_shares_results_across_processes(shared, forked):
    class Repo:
        def __init__(self, name):
            self.name = name
            self.calls = 0

        # cachetools' methodkey leaves self out: put what tells instances
        # apart into the key
        @cachetools.cachedmethod(
            lambda self: shared, key=lambda self, *a, **kw: cachetools.keys.hashkey(self.name, *a, **kw)
        )
        def lookup(self, item):
            self.calls += 1
            return f"{self.name}/{item}@{os.getpid()}"

    def child():
        return Repo("a").lookup(1), Repo("b").lookup(1)

    a1, b1 = forked(child)
    a, b = Repo("a"), Repo("b")
    assert a.lookup(1) == a1 and b.lookup(1) == b1 and a1 != b1
    assert a.calls == b.calls == 0


def test_keys_do_not_depend_on_the_hash_seed(shared):
    """Another interpreter, with another hash seed (set and dict orders
    differ), makes the same fastmmap key for equal arguments."""
    key = cachetools.keys.hashkey(frozenset({"alpha", "beta", "gamma", "delta"}), {"b": 2, "a": 1}, x=(1, 2.0))
    code = (
        "import sys, cachetools, fastmmap; from fastmmap.contrib.cachetools import SharedCache; "
        "c = SharedCache(sys.argv[1]); "
        "k = cachetools.keys.hashkey(frozenset({'delta', 'gamma', 'beta', 'alpha'}), {'a': 1, 'b': 2}, x=(1, 2)); "
        "print(c.key_for(k))"
    )
    keys = set()
    for seed in ("1", "2", "3"):
        out = subprocess.run(
            [sys.executable, "-c", code, shared.cache.share_file],
            env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True, check=True, timeout=60,
        )
        keys.add(out.stdout.strip())
    assert keys == {shared.key_for(key)}


def test_value_too_large_for_a_page(tmp_path):
    shared = SharedCache(str(tmp_path / "small.cache"), page_size="64k", num_pages=3)
    calls = []

    @cachetools.cached(cache=shared)
    def blob(n):
        calls.append(n)
        return b"x" * n

    assert blob(100_000) == b"x" * 100_000  # returned, not cached
    assert blob(100_000) == b"x" * 100_000
    assert calls == [100_000, 100_000] and len(shared) == 0
    shared["k"] = "small"
    with pytest.raises(ValueError, match="too large"):
        shared["k"] = b"y" * 100_000
    assert "k" not in shared  # the old value is not left in its place
    shared.cache.close()


def test_plain_fastmmap_cache_with_a_str_key(tmp_path, forked):
    """A plain fastmmap.Cache is a cache for cachetools when key= makes str
    keys; a value too large raises ItemTooLargeError, a ValueError, which
    cachetools takes as "not cached"."""
    fmm = fastmmap.Cache(str(tmp_path / "plain.cache"), page_size="64k", num_pages=3)
    calls = []

    @cachetools.cached(cache=fmm, key=lambda n: f"blob:{n}")
    def blob(n):
        calls.append(n)
        return b"x" * n

    assert forked(lambda: blob(10)) == b"x" * 10
    assert blob(10) == b"x" * 10 and calls == []
    assert blob(100_000) == b"x" * 100_000 and blob(100_000) and calls == [100_000, 100_000]
    fmm.close()


def test_mapping_protocol_and_namespaces(tmp_path):
    path = str(tmp_path / "ns.cache")
    one = SharedCache(path, namespace="one:")
    two = SharedCache(fastmmap.Cache(path), namespace="two:")
    one[(1, "a")] = "x"
    one["k"] = None
    two[(1, "a")] = "y"
    assert one[(1, "a")] == "x" and two[(1, "a")] == "y"
    assert one["k"] is None and "k" in one and "k" not in two
    assert sorted(map(repr, one)) == sorted(map(repr, [(1, "a"), "k"]))
    assert len(one) == 2 and len(two) == 1
    assert one.get("missing", 5) == 5
    with pytest.raises(KeyError):
        one["missing"]
    del one["k"]
    with pytest.raises(KeyError):
        del one["k"]
    one.clear()
    assert len(one) == 0 and two[(1, "a")] == "y"
    two.cache.close()
    one.cache.close()


def test_bad_input(tmp_path):
    path = tmp_path / "bad.cache"
    with pytest.raises(ValueError, match="serializer='pickle'"):
        SharedCache(str(path), serializer="json")
    assert not path.exists()
    with pytest.raises(ValueError, match="namespace"):
        SharedCache(str(path), namespace="")
    with pytest.raises(TypeError, match="fastmmap.Cache or a path"):
        SharedCache(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="serializer='pickle'"):
        with fastmmap.Cache(str(path), serializer="json") as fmm:
            SharedCache(fmm)
    shared = SharedCache(str(path))
    with pytest.raises(TypeError, match="picklable"):
        shared[functools.partial(lambda: None)] = 1
    assert len(shared) == 0
    shared.cache.close()
