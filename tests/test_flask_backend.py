"""fastmmap.contrib.cachelib.FastMmapCache: cachelib's contract and Flask-Caching.

The first part re-implements cachelib's own backend tests (CommonTests,
ClearTests, HasTests, DeleteManyWithPrefixTests in cachelib's tests/, which
the wheel does not ship) with cachelib's sample data; then the timeout
meaning (0 = never in cachelib), atomic inc/dec across processes, key
prefixes and values too big for a page.  The second part runs real Flask
apps configured through Flask-Caching's CACHE_TYPE: cached views and
memoized functions, served from the cache on the second request, also when
the first one ran in another (forked) process.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import time

import pytest

cachelib = pytest.importorskip("cachelib")

from fastmmap.contrib.cachelib import FastMmapCache, fastmmap_cache  # noqa: E402

PAGE_SIZE = 64 * 1024

# cachelib's tests/conftest.py TestData
sample_numbers = [0, 10, 1024000, 9, 5000000000000, 99, 738, 2000000]
sample_pairs = {
    "128": False,
    "beef": True,
    "crevettes": {},
    "1024": "spam",
    "bacon": "eggs",
    "sausage": 2048,
    "3072": [],
    "brandy": [{}, "fried eggs"],
    "lobster": ["baked beans", [512]],
    "4096": {"sauce": [], 256: "truffle"},
}


@pytest.fixture
def cache_factory(tmp_path):
    made = []

    def make(name="c.cache", **kwargs):
        kwargs.setdefault("page_size", PAGE_SIZE)
        kwargs.setdefault("num_pages", 8)
        c = FastMmapCache(str(tmp_path / name), **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        if c._fmm is not None:
            c._fmm.close()


@pytest.fixture
def cache(cache_factory):
    return cache_factory()


# ---------------------------------------------------------------- cachelib's CommonTests


def test_set_get(cache):
    for k, v in sample_pairs.items():
        assert cache.set(k, v)
        assert cache.get(k) == v


def test_set_get_many(cache):
    assert cache.set_many(sample_pairs) == list(sample_pairs.keys())
    assert cache.get_many(*sample_pairs) == list(sample_pairs.values())


def test_get_dict(cache):
    cache.set_many(sample_pairs)
    assert cache.get_dict(*sample_pairs) == sample_pairs


def test_delete(cache):
    for k, v in sample_pairs.items():
        cache.set(k, v)
        assert cache.delete(k)
        assert not cache.get(k)
    assert cache.delete("never-set") is False


def test_delete_many(cache):
    cache.set_many(sample_pairs)
    assert cache.delete_many(*sample_pairs) == list(sample_pairs.keys())
    assert not any(cache.get_many(*sample_pairs))


def test_delete_many_ignore_errors(cache):
    cache.set("bacon", "spam")
    cache.delete_many("eggs", "bacon")
    assert cache.get("bacon") is None


def test_delete_many_with_prefix(cache_factory):
    cache = cache_factory(key_prefix="test_prefix:")
    cache.set_many({"foo": 1, "bar": 2, "baz": 3})
    assert cache.delete_many("foo", "bar", "baz") == ["foo", "bar", "baz"]
    assert not any(cache.get_many("foo", "bar", "baz"))


def test_add(cache):
    cache.set_many(sample_pairs)
    for k in sample_pairs:
        assert not cache.add(k, "updated")
    assert cache.get_many(*sample_pairs) == list(sample_pairs.values())
    for k, v in sample_pairs.items():
        assert cache.add(f"{k}-new", v)
        assert cache.get(f"{k}-new") == v


def test_inc_dec(cache):
    for n in sample_numbers:
        assert not cache.get(f"{n}-key-inc")
        assert cache.inc(f"{n}-key-inc", n) == n
        assert cache.get(f"{n}-key-inc") == n
        assert cache.dec(f"{n}-key-dec", n) == -n
        assert cache.get(f"{n}-key-dec") == -n
        assert cache.dec(f"{n}-key-inc", 5) == n - 5
    assert cache.inc("fresh") == 1 and cache.inc("fresh") == 2 and cache.dec("fresh") == 1


def test_inc_of_a_non_number_raises(cache):
    cache.set("s", "text")
    with pytest.raises(TypeError):
        cache.inc("s")
    assert cache.get("s") == "text"


def test_clear(cache):
    assert cache.set_many(sample_pairs)
    assert cache.clear()
    assert not any(cache.get_many(*sample_pairs))


def test_has(cache):
    assert cache.set_many(sample_pairs)
    for k in sample_pairs:
        assert cache.has(k)
    assert not cache.has("unknown")
    cache.set("none", None)
    assert cache.has("none") and cache.get("none") is None


def test_has_all_base_methods(cache):
    import inspect

    for name, _ in inspect.getmembers(cachelib.BaseCache, predicate=inspect.isfunction):
        if not name.startswith("_"):
            assert callable(getattr(cache, name))
    for name in ("get", "set", "add", "delete", "has", "clear", "get_many", "set_many", "inc", "dec"):
        assert getattr(FastMmapCache, name) is not getattr(cachelib.BaseCache, name), name


@pytest.mark.slow
def test_expiration(cache):
    """cachelib's test_expiration, against the real clock: timeout=0 never expires."""
    t0 = time.time()
    for k, v in sample_pairs.items():
        cache.set(f"{k}-t0", v, timeout=0)
        cache.set(f"{k}-t1", v, timeout=1)
    cache.set("td", "x", timeout=dt.timedelta(milliseconds=200))  # rounded up to 1 s
    t1 = time.time()
    time.sleep(max(0.0, t0 + 0.9 - time.time()))
    # never early: stored after t0, so there until t0 + 1 (a check that a
    # busy machine delayed past that proves nothing, and is not made)
    ok = cache.get("beef-t1") is True and cache.get("td") == "x"
    assert ok or time.time() >= t0 + 1
    time.sleep(max(0.0, math.ceil(t1 + 1) + 0.05 - time.time()))
    for k, v in sample_pairs.items():
        assert cache.get(f"{k}-t0") == v
        assert not cache.get(f"{k}-t1")
        assert not cache.has(f"{k}-t1")
    assert cache.get("td") is None


# ---------------------------------------------------------------- timeouts, prefixes, limits


def _expire_on(c, key):
    (entry,) = [e for e in c.fastmmap_cache.get_keys(1) if e["key"] == c.key_prefix + key]
    return entry["expire_on"]


def test_timeout_meaning(cache_factory):
    cache = cache_factory(default_timeout=300)
    t0 = time.time()
    cache.set("default", 1)
    cache.set("zero", 1, timeout=0)
    cache.set("td", 1, timeout=dt.timedelta(minutes=2))
    cache.add("added", 1, timeout=60)
    cache.set_many({"many": 1}, timeout=30)
    cache.set("huge", 1, timeout=10**12)
    cache.set("counter", 5, timeout=0)
    cache.inc("counter")
    t1 = time.time()
    assert math.ceil(t0 + 300) <= _expire_on(cache, "default") <= math.ceil(t1 + 300)
    assert _expire_on(cache, "zero") == 0  # cachelib: 0 = never expires
    assert math.ceil(t0 + 120) <= _expire_on(cache, "td") <= math.ceil(t1 + 120)
    assert math.ceil(t0 + 60) <= _expire_on(cache, "added") <= math.ceil(t1 + 60)
    assert math.ceil(t0 + 30) <= _expire_on(cache, "many") <= math.ceil(t1 + 30)
    assert _expire_on(cache, "huge") == 2**32 - 1
    # inc() gives the entry the default timeout again (as cachelib's generic inc()).
    assert math.ceil(t0 + 300) <= _expire_on(cache, "counter") <= math.ceil(t1 + 300)

    forever = cache_factory("forever.cache", default_timeout=0)
    forever.set("k", 1)
    forever.inc("n")
    assert _expire_on(forever, "k") == 0 and _expire_on(forever, "n") == 0


def test_negative_timeout_expires_at_once(cache):
    cache.set("k", "old")
    assert cache.set("k", "new", timeout=-1) is True
    assert cache.has("k") is False
    assert cache.add("k", "new", timeout=-1) is True  # absent: "added", already expired
    assert cache.has("k") is False
    cache.set("k", "old")
    assert cache.add("k", "new", timeout=-1) is False
    assert cache.set_many({"k": 1, "j": 2}, timeout=-5) == ["k", "j"]
    assert not cache.has("k") and not cache.has("j")


def test_float_timeout_is_deprecated_in_cachelib(cache):
    with pytest.warns(DeprecationWarning, match="Float timeouts"):
        cache.set("k", 1, timeout=1.5)
    assert cache.get("k") == 1


def test_key_prefix(cache_factory):
    a = cache_factory(key_prefix="a:")
    b = cache_factory(key_prefix="b:")
    plain = cache_factory()
    a.set("k", "from a")
    b.set("k", "from b")
    assert a.get("k") == "from a" and b.get("k") == "from b"
    assert plain.get("a:k") == "from a"
    assert a.clear() is True  # with a prefix: only that prefix
    assert a.get("k") is None and b.get("k") == "from b"
    assert plain.clear() is True  # without: the whole file
    assert b.get("k") is None


def test_value_too_big_for_a_page(cache):
    big = os.urandom(PAGE_SIZE * 2)
    assert cache.set("k", "old") is True
    assert cache.set("k", big) is False
    assert cache.has("k") is False  # the old value is not left behind
    assert cache.set_many({"big": big, "small": 1}) == ["small"]
    assert cache.add("big2", big) is False and not cache.has("big2")


def test_constructor_errors_and_lazy_open(tmp_path):
    with pytest.raises(ValueError, match="share_file"):
        FastMmapCache()
    with pytest.raises(TypeError, match="bogus"):
        FastMmapCache(str(tmp_path / "c"), bogus=1)
    with pytest.raises(TypeError):
        FastMmapCache(str(tmp_path / "c"), anonymous=True)
    path = tmp_path / "lazy.cache"
    c = FastMmapCache(str(path), cache_size="1m", serializer="json")
    assert not path.exists()  # opened on first use
    c.set("k", {"a": 1})
    assert path.exists() and c.get("k") == {"a": 1}
    c.fastmmap_cache.close()
    assert path.exists()  # unlink_on_exit defaults to False
    assert c.get("k") == {"a": 1}  # reopened


@pytest.mark.timeout(60)
def test_inc_is_atomic_across_processes(cache, forked):
    start_at = time.time() + 0.2  # all four children run at once

    def work():
        time.sleep(max(0.0, start_at - time.time()))
        for _ in range(500):
            cache.inc("n")
        for _ in range(100):
            cache.dec("m")
        return os.getpid()

    children = [forked.start(work) for _ in range(4)]
    assert len({child.result() for child in children}) == 4
    assert cache.get("n") == 2000
    assert cache.get("m") == -400


def test_opened_in_the_child_only(tmp_path, forked):
    """Created before the fork but first used in the children (gunicorn --preload)."""
    path = tmp_path / "late.cache"
    cache = FastMmapCache(str(path))

    def work():
        cache.inc("n", 10)
        return cache.fastmmap_cache.share_file

    assert {forked.start(work).result() for _ in range(3)} == {str(path)}
    assert cache.get("n") == 30
    cache.fastmmap_cache.close()


# ---------------------------------------------------------------- Flask-Caching

def make_app(config):
    """A Flask app with a cached view and a memoized function, counting real calls."""
    flask = pytest.importorskip("flask")
    flask_caching = pytest.importorskip("flask_caching")
    app = flask.Flask(__name__)
    app.config.update(config)
    cache = flask_caching.Cache(app)
    calls = []

    @app.route("/page")
    @cache.cached(timeout=60)
    def page():
        calls.append("page")
        return f"page rendered by {os.getpid()} (call {len(calls)})"

    @cache.memoize(timeout=60)
    def square(x):
        calls.append(("square", x))
        return {"x": x, "square": x * x, "pid": os.getpid()}

    @app.route("/square/<int:x>")
    def square_view(x):
        return square(x)

    app.square = square
    return app, cache, calls


def test_flask_caching_cache_type(tmp_path):
    path = tmp_path / "flask.cache"
    app, cache, calls = make_app(
        {
            "CACHE_TYPE": "fastmmap.contrib.cachelib.FastMmapCache",
            "CACHE_DEFAULT_TIMEOUT": 120,
            "CACHE_OPTIONS": {"share_file": str(path), "cache_size": "1m"},
        }
    )
    backend = cache.cache
    assert isinstance(backend, FastMmapCache) and backend.default_timeout == 120
    client = app.test_client()
    first = client.get("/page").get_data(as_text=True)
    assert client.get("/page").get_data(as_text=True) == first
    assert calls == ["page"]

    assert client.get("/square/7").json["square"] == 49
    assert client.get("/square/7").json["square"] == 49
    assert app.square(7)["square"] == 49
    assert calls == ["page", ("square", 7)]
    with app.app_context():
        cache.delete_memoized(app.square, 7)
    assert client.get("/square/7").json["square"] == 49
    assert calls == ["page", ("square", 7), ("square", 7)]

    assert backend.fastmmap_cache.share_file == str(path)
    assert len(backend.fastmmap_cache) > 0
    with app.app_context():
        cache.clear()
    assert len(backend.fastmmap_cache) == 0
    backend.fastmmap_cache.close()


@pytest.mark.timeout(60)
def test_flask_processes_share_cached_views(tmp_path, forked):
    app, cache, calls = make_app(
        {
            "CACHE_TYPE": "fastmmap.contrib.cachelib.FastMmapCache",
            "CACHE_ARGS": [str(tmp_path / "shared.cache")],
        }
    )
    client = app.test_client()

    def child():
        c = app.test_client()
        page = c.get("/page").get_data(as_text=True)
        square = c.get("/square/12").json
        return page, square, list(calls)

    # The child renders both; the parent is then served the child's results.
    child_page, child_square, child_calls = forked(child)
    assert child_calls == ["page", ("square", 12)]
    assert str(os.getpid()) not in child_page
    assert client.get("/page").get_data(as_text=True) == child_page
    assert client.get("/square/12").json == child_square
    assert child_square["pid"] != os.getpid()
    assert calls == []

    # And the other way round: the parent renders, a new child reads it.
    assert client.get("/square/5").json["pid"] == os.getpid()
    assert calls == [("square", 5)]

    def second_child():
        return app.test_client().get("/square/5").json, list(calls)

    square, child_calls = forked(second_child)
    assert square["pid"] == os.getpid() and child_calls == [("square", 5)]
    cache.cache.fastmmap_cache.close()


def test_flask_caching_factory_function(tmp_path):
    """fastmmap_cache works under either calling convention of Flask-Caching."""
    # A CACHE_TYPE containing "cachelib" is called like a cachelib class.
    app, cache, _ = make_app(
        {
            "CACHE_TYPE": "fastmmap.contrib.cachelib.fastmmap_cache",
            "CACHE_OPTIONS": {"share_file": str(tmp_path / "f.cache"), "key_prefix": "app1:"},
        }
    )
    assert isinstance(cache.cache, FastMmapCache) and cache.cache.key_prefix == "app1:"
    # The factory protocol itself.
    config = {"CACHE_TYPE": "x", "CACHE_DIR": str(tmp_path / "dir"), "CACHE_KEY_PREFIX": "p_"}
    backend = fastmmap_cache(app, config, [], {"default_timeout": 10})
    assert backend.fastmmap_cache.share_file == str(tmp_path / "dir" / "fastmmap.cache")
    assert backend.key_prefix == "p_" and backend.default_timeout == 10
    backend2 = FastMmapCache.factory(app, config, [str(tmp_path / "g.cache")], {"key_prefix": ""})
    assert backend2.fastmmap_cache.share_file == str(tmp_path / "g.cache") and backend2.key_prefix == ""
    with pytest.raises(ValueError, match="CACHE_DIR"):
        FastMmapCache.factory(app, {"CACHE_TYPE": "x"}, [], {})
    for c in (cache.cache, backend, backend2):
        c.fastmmap_cache.close()


def test_flask_caching_factory_route(tmp_path, monkeypatch):
    """Re-exported from a module whose name lacks "cachelib", the factory is
    used by Flask-Caching, and CACHE_DIR and CACHE_KEY_PREFIX apply."""
    (tmp_path / "fmm_flask_glue.py").write_text("from fastmmap.contrib.cachelib import fastmmap_cache\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    app, cache, calls = make_app(
        {
            "CACHE_TYPE": "fmm_flask_glue.fastmmap_cache",
            "CACHE_DIR": str(tmp_path / "cache-dir"),
            "CACHE_KEY_PREFIX": "myapp_",
        }
    )
    backend = cache.cache
    client = app.test_client()
    assert client.get("/page").data == client.get("/page").data
    assert calls == ["page"]
    fmm = backend.fastmmap_cache
    assert fmm.share_file == str(tmp_path / "cache-dir" / "fastmmap.cache")
    assert fmm.keys() and all(k.startswith("myapp_") for k in fmm.keys())
    fmm.close()


def test_flask_alias_honours_cache_dir_and_prefix(tmp_path):
    """CACHE_TYPE = "fastmmap.contrib.flask.FastMmapCache" goes through the
    factory, so CACHE_DIR and CACHE_KEY_PREFIX are used."""
    import flask
    import flask_caching

    import fastmmap

    app = flask.Flask("alias")
    app.config.update(
        CACHE_TYPE="fastmmap.contrib.flask.FastMmapCache",
        CACHE_DIR=str(tmp_path / "cachedir"),
        CACHE_KEY_PREFIX="site1:",
    )
    cache = flask_caching.Cache(app)
    calls = []

    @app.route("/")
    @cache.cached(timeout=60)
    def index():
        calls.append(1)
        return "hello"

    client = app.test_client()
    assert client.get("/").data == b"hello"
    assert client.get("/").data == b"hello"
    assert len(calls) == 1
    path = tmp_path / "cachedir" / "fastmmap.cache"
    assert path.exists()
    with fastmmap.Cache(str(path)) as raw:
        assert raw.keys() and all(str(k).startswith("site1:") for k in raw.keys())
