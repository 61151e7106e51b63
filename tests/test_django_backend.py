"""fastmmap.contrib.django.FastMmapCache against Django's cache contract.

Django's test suite is not shipped in the django wheel, so the assertions of
its ``BaseCacheTests`` (tests/cache/tests.py upstream) that apply to a
persistent local cache are re-implemented here, test by test and under the
same names, against caches configured through ``settings.CACHES`` exactly as
a site would.  Left out: culling (MAX_ENTRIES; fastmmap evicts per page
instead) and the tests that need a database.  Then the backend's own
promises: fork and threads, atomic incr across processes, lazy opening,
configuration errors and values too big for a page.

Tests that wait for real expiry are marked ``slow``; the whole file runs in
about 5 seconds.
"""

from __future__ import annotations

import asyncio
import math
import os
import pickle
import re
import threading
import time
from unittest import mock
from zlib import compress, decompress

import pytest

django = pytest.importorskip("django")

from django.conf import settings  # noqa: E402

BACKEND = "fastmmap.contrib.django.FastMmapCache"
PAGE_SIZE = 64 * 1024

KEY_ERRORS_WITH_MEMCACHED_MSG = "Cache key contains characters that will cause errors if used with memcached: %r"


# functions/classes for complex data type tests (as upstream)
def f():
    return 42


class C:
    def m(n):
        return 24


class Unpicklable:
    def __getstate__(self):
        raise pickle.PickleError()


def custom_key_func(key, key_prefix, version):
    "A customized cache key function"
    return "CUSTOM-" + "-".join([key_prefix, str(version), key])


def caches_setting(location, fresh_location):
    base = {"BACKEND": BACKEND, "LOCATION": str(location), "OPTIONS": {"page_size": PAGE_SIZE, "num_pages": 16}}
    return {
        "default": base,
        "prefix": {**base, "KEY_PREFIX": f"cacheprefix{os.getpid()}"},
        "v2": {**base, "VERSION": 2},
        "custom_key": {**base, "KEY_FUNCTION": custom_key_func},
        "custom_key2": {**base, "KEY_FUNCTION": f"{__name__}.custom_key_func"},
        # Django's own culling options are accepted and ignored.
        "cull": {**base, "OPTIONS": {**base["OPTIONS"], "MAX_ENTRIES": 30, "CULL_FREQUENCY": 0}},
        # A file no process has opened yet (see test_backend_created_before_fork).
        "fresh": {**base, "LOCATION": str(fresh_location)},
    }


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    if not settings.configured:
        settings.configure(
            SECRET_KEY="fastmmap-tests",
            ALLOWED_HOSTS=["testserver"],
            USE_TZ=True,
            CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}},
        )
        django.setup()
    from django.test import override_settings

    path = tmp_path_factory.mktemp("django-cache")
    with override_settings(CACHES=caches_setting(path / "site.cache", path / "fresh.cache")):
        yield path


@pytest.fixture
def caches(cache_dir):
    from django.core.cache import caches

    return caches


@pytest.fixture
def cache(caches):
    """The default cache, cleared after each test (as BaseCacheTests.tearDown)."""
    from django.core.cache import cache

    yield cache
    cache.clear()


# ---------------------------------------------------------------- BaseCacheTests


def test_simple(cache):
    cache.set("key", "value")
    assert cache.get("key") == "value"


def test_default_used_when_none_is_set(cache):
    """If None is cached, get() returns it instead of the default."""
    cache.set("key_default_none", None)
    assert cache.get("key_default_none", default="default") is None


def test_add(cache):
    assert cache.add("addkey1", "value") is True
    assert cache.add("addkey1", "newvalue") is False
    assert cache.get("addkey1") == "value"


def test_prefix(cache, caches):
    cache.set("somekey", "value")
    assert caches["prefix"].has_key("somekey") is False
    caches["prefix"].set("somekey", "value2")
    assert cache.get("somekey") == "value"
    assert caches["prefix"].get("somekey") == "value2"


def test_non_existent(cache):
    assert cache.get("does_not_exist") is None
    assert cache.get("does_not_exist", "bang!") == "bang!"


def test_get_many(cache):
    cache.set_many({"a": "a", "b": "b", "c": "c", "d": "d"})
    assert cache.get_many(["a", "c", "d"]) == {"a": "a", "c": "c", "d": "d"}
    assert cache.get_many(["a", "b", "e"]) == {"a": "a", "b": "b"}
    assert cache.get_many(iter(["a", "b", "e"])) == {"a": "a", "b": "b"}
    cache.set_many({"x": None, "y": 1})
    assert cache.get_many(["x", "y"]) == {"x": None, "y": 1}


def test_delete(cache):
    cache.set_many({"key1": "spam", "key2": "eggs"})
    assert cache.get("key1") == "spam"
    assert cache.delete("key1") is True
    assert cache.get("key1") is None
    assert cache.get("key2") == "eggs"


def test_delete_nonexistent(cache):
    assert cache.delete("nonexistent_key") is False


def test_has_key(cache):
    cache.set("hello1", "goodbye1")
    assert cache.has_key("hello1") is True
    assert cache.has_key("goodbye1") is False
    cache.set("no_expiry", "here", None)
    assert cache.has_key("no_expiry") is True
    cache.set("null", None)
    assert cache.has_key("null") is True


def test_in(cache):
    cache.set("hello2", "goodbye2")
    assert "hello2" in cache
    assert "goodbye2" not in cache
    cache.set("null", None)
    assert "null" in cache


def test_incr(cache):
    cache.set("answer", 41)
    assert cache.incr("answer") == 42
    assert cache.get("answer") == 42
    assert cache.incr("answer", 10) == 52
    assert cache.get("answer") == 52
    assert cache.incr("answer", -10) == 42
    with pytest.raises(ValueError):
        cache.incr("does_not_exist")
    with pytest.raises(ValueError):
        cache.incr("does_not_exist", -1)
    assert cache.has_key("does_not_exist") is False  # a failed incr stores nothing
    cache.set("null", None)
    with pytest.raises(TypeError):
        cache.incr("null")
    assert cache.has_key("null") is True and cache.get("null", "x") is None


def test_decr(cache):
    cache.set("answer", 43)
    assert cache.decr("answer") == 42
    assert cache.get("answer") == 42
    assert cache.decr("answer", 10) == 32
    assert cache.get("answer") == 32
    assert cache.decr("answer", -10) == 42
    with pytest.raises(ValueError):
        cache.decr("does_not_exist")
    with pytest.raises(ValueError):
        cache.incr("does_not_exist", -1)
    cache.set("null", None)
    with pytest.raises(TypeError):
        cache.decr("null")


def test_incr_non_number(cache):
    cache.set("s", "text")
    with pytest.raises(TypeError):
        cache.incr("s")
    assert cache.get("s") == "text"


def test_close(cache):
    assert hasattr(cache, "close")
    cache.close()
    cache.set("after-close", 1)  # close() keeps the mapping open
    assert cache.get("after-close") == 1


def test_data_types(cache):
    tests = {
        "string": "this is a string",
        "int": 42,
        "bool": True,
        "list": [1, 2, 3, 4],
        "tuple": (1, 2, 3, 4),
        "dict": {"A": 1, "B": 2},
        "function": f,
        "class": C,
    }
    for key, value in tests.items():
        cache.set(key, value)
        assert cache.get(key) == value, key


def test_str_subclass_keeps_its_type(cache):
    from django.utils.safestring import SafeString, mark_safe

    cache.set("safe", mark_safe("<b>x</b>"))
    value = cache.get("safe")
    assert value == "<b>x</b>" and isinstance(value, SafeString)


def test_unicode(cache):
    stuff = {
        "ascii": "ascii_value",
        "unicode_ascii": "Iñtërnâtiônàlizætiøn1",
        "Iñtërnâtiônàlizætiøn": "Iñtërnâtiônàlizætiøn2",
        "ascii2": {"x": 1},
    }
    for key, value in stuff.items():
        cache.set(key, value)
        assert cache.get(key) == value
    for key, value in stuff.items():
        assert cache.delete(key) is True
        assert cache.add(key, value) is True
        assert cache.get(key) == value
    for key in stuff:
        assert cache.delete(key) is True
    cache.set_many(stuff)
    for key, value in stuff.items():
        assert cache.get(key) == value


def test_binary_string(cache):
    value = "value_to_be_compressed"
    compressed_value = compress(value.encode())

    cache.set("binary1", compressed_value)
    compressed_result = cache.get("binary1")
    assert compressed_value == compressed_result
    assert value == decompress(compressed_result).decode()

    assert cache.add("binary1-add", compressed_value) is True
    compressed_result = cache.get("binary1-add")
    assert compressed_value == compressed_result
    assert value == decompress(compressed_result).decode()

    cache.set_many({"binary1-set_many": compressed_value})
    compressed_result = cache.get("binary1-set_many")
    assert compressed_value == compressed_result
    assert value == decompress(compressed_result).decode()


def test_set_many(cache):
    cache.set_many({"key1": "spam", "key2": "eggs"})
    assert cache.get("key1") == "spam"
    assert cache.get("key2") == "eggs"


def test_set_many_returns_empty_list_on_success(cache):
    assert cache.set_many({"key1": "spam", "key2": "eggs"}) == []


def test_set_many_empty_data(cache):
    assert cache.set_many({}) == []


def test_delete_many(cache):
    cache.set_many({"key1": "spam", "key2": "eggs", "key3": "ham"})
    cache.delete_many(["key1", "key2"])
    assert cache.get("key1") is None
    assert cache.get("key2") is None
    assert cache.get("key3") == "ham"


def test_delete_many_no_keys(cache):
    assert cache.delete_many([]) is None


def test_clear(cache, caches):
    cache.set_many({"key1": "spam", "key2": "eggs"})
    caches["prefix"].set("key3", "ham")
    cache.clear()
    assert cache.get("key1") is None
    assert cache.get("key2") is None
    assert caches["prefix"].get("key3") is None  # clear() empties the whole file


def test_long_timeout(cache):
    """A timeout over 30 days is a relative timeout here too (memcached's convention is its own)."""
    cache.set("key1", "eggs", 60 * 60 * 24 * 30 + 1)
    assert cache.get("key1") == "eggs"
    assert cache.add("key2", "ham", 60 * 60 * 24 * 30 + 1) is True
    assert cache.get("key2") == "ham"
    cache.set_many({"key3": "sausage", "key4": "lobster bisque"}, 60 * 60 * 24 * 30 + 1)
    assert cache.get("key3") == "sausage"
    assert cache.get("key4") == "lobster bisque"


def test_forever_timeout(cache):
    cache.set("key1", "eggs", None)
    assert cache.get("key1") == "eggs"
    assert cache.add("key2", "ham", None) is True
    assert cache.get("key2") == "ham"
    assert cache.add("key1", "new eggs", None) is False
    assert cache.get("key1") == "eggs"
    cache.set_many({"key3": "sausage", "key4": "lobster bisque"}, None)
    assert cache.get("key3") == "sausage"
    assert cache.get("key4") == "lobster bisque"
    # touch(timeout=None) after a short timeout: see test_expiration_real_clock.


def test_zero_timeout(cache):
    cache.set("key1", "eggs", 0)
    assert cache.get("key1") is None

    assert cache.add("key2", "ham", 0) is True
    assert cache.get("key2") is None

    cache.set_many({"key3": "sausage", "key4": "lobster bisque"}, 0)
    assert cache.get("key3") is None
    assert cache.get("key4") is None

    cache.set("key5", "belgian fries", timeout=5)
    assert cache.touch("key5", timeout=0) is True
    assert cache.get("key5") is None


def test_zero_and_negative_timeout_remove_an_existing_value(cache):
    for timeout in (0, -1, -0.5):
        cache.set("k", "old")
        cache.set("k", "new", timeout)
        assert cache.has_key("k") is False
        cache.set("k", "old")
        assert cache.add("k", "new", timeout) is False  # present: not added
        assert cache.get("k") == "old"
        assert cache.set_many({"k": "new"}, timeout) == []
        assert cache.has_key("k") is False
        assert cache.touch("k", timeout) is False


def test_float_timeout(cache):
    cache.set("key1", "spam", 100.2)
    assert cache.get("key1") == "spam"


def test_invalid_key_characters(cache):
    key = "key with spaces and 清"
    _perform_invalid_key_test(cache, key, KEY_ERRORS_WITH_MEMCACHED_MSG % key)


def test_invalid_key_length(cache):
    key = ("a" * 250) + "清"
    expected = "Cache key will cause errors if used with memcached: %r (longer than %s)" % (key, 250)
    _perform_invalid_key_test(cache, key, expected)


def test_invalid_with_version_key_length(cache):
    def key_func(key, *args):
        return key + ":1"

    key = "a" * 249
    expected = "Cache key will cause errors if used with memcached: %r (longer than %s)" % (key_func(key), 250)
    _perform_invalid_key_test(cache, key, expected, key_func=key_func)


def _perform_invalid_key_test(cache, key, expected_warning, key_func=None):
    from django.core.cache import CacheKeyWarning

    def func(key, *args):
        return key

    old_func = cache.key_func
    cache.key_func = key_func or func
    tests = [
        ("add", [key, 1]),
        ("get", [key]),
        ("set", [key, 1]),
        ("incr", [key]),
        ("decr", [key]),
        ("touch", [key]),
        ("delete", [key]),
        ("get_many", [[key, "b"]]),
        ("set_many", [{key: 1, "b": 2}]),
        ("delete_many", [[key, "b"]]),
    ]
    try:
        for operation, args in tests:
            with pytest.warns(CacheKeyWarning, match="^" + re.escape(expected_warning) + "$"):
                getattr(cache, operation)(*args)
    finally:
        cache.key_func = old_func


def test_cache_versioning_get_set(cache, caches):
    cache.set("answer1", 42)
    assert cache.get("answer1") == 42
    assert cache.get("answer1", version=1) == 42
    assert cache.get("answer1", version=2) is None
    assert caches["v2"].get("answer1") is None
    assert caches["v2"].get("answer1", version=1) == 42
    assert caches["v2"].get("answer1", version=2) is None

    cache.set("answer2", 42, version=2)
    assert cache.get("answer2") is None
    assert cache.get("answer2", version=1) is None
    assert cache.get("answer2", version=2) == 42
    assert caches["v2"].get("answer2") == 42
    assert caches["v2"].get("answer2", version=1) is None
    assert caches["v2"].get("answer2", version=2) == 42

    caches["v2"].set("answer3", 42)
    assert cache.get("answer3") is None
    assert cache.get("answer3", version=1) is None
    assert cache.get("answer3", version=2) == 42
    assert caches["v2"].get("answer3") == 42
    assert caches["v2"].get("answer3", version=1) is None
    assert caches["v2"].get("answer3", version=2) == 42

    caches["v2"].set("answer4", 42, version=1)
    assert cache.get("answer4") == 42
    assert cache.get("answer4", version=1) == 42
    assert cache.get("answer4", version=2) is None
    assert caches["v2"].get("answer4") is None
    assert caches["v2"].get("answer4", version=1) == 42
    assert caches["v2"].get("answer4", version=2) is None


def test_cache_versioning_add(cache, caches):
    assert cache.add("answer1", 42, version=2) is True
    assert cache.get("answer1", version=1) is None
    assert cache.get("answer1", version=2) == 42
    assert cache.add("answer1", 37, version=2) is False
    assert cache.get("answer1", version=1) is None
    assert cache.get("answer1", version=2) == 42
    assert cache.add("answer1", 37, version=1) is True
    assert cache.get("answer1", version=1) == 37
    assert cache.get("answer1", version=2) == 42

    assert caches["v2"].add("answer2", 42) is True
    assert cache.get("answer2", version=1) is None
    assert cache.get("answer2", version=2) == 42
    assert caches["v2"].add("answer2", 37) is False
    assert cache.get("answer2", version=1) is None
    assert cache.get("answer2", version=2) == 42
    assert caches["v2"].add("answer2", 37, version=1) is True
    assert cache.get("answer2", version=1) == 37
    assert cache.get("answer2", version=2) == 42

    assert caches["v2"].add("answer3", 42, version=1) is True
    assert cache.get("answer3", version=1) == 42
    assert cache.get("answer3", version=2) is None
    assert caches["v2"].add("answer3", 37, version=1) is False
    assert cache.get("answer3", version=1) == 42
    assert cache.get("answer3", version=2) is None
    assert caches["v2"].add("answer3", 37) is True
    assert cache.get("answer3", version=1) == 42
    assert cache.get("answer3", version=2) == 37


def test_cache_versioning_has_key(cache, caches):
    cache.set("answer1", 42)
    assert cache.has_key("answer1") is True
    assert cache.has_key("answer1", version=1) is True
    assert cache.has_key("answer1", version=2) is False
    assert caches["v2"].has_key("answer1") is False
    assert caches["v2"].has_key("answer1", version=1) is True
    assert caches["v2"].has_key("answer1", version=2) is False


def test_cache_versioning_delete(cache, caches):
    cache.set("answer1", 37, version=1)
    cache.set("answer1", 42, version=2)
    assert cache.delete("answer1") is True
    assert cache.get("answer1", version=1) is None
    assert cache.get("answer1", version=2) == 42

    cache.set("answer2", 37, version=1)
    cache.set("answer2", 42, version=2)
    assert cache.delete("answer2", version=2) is True
    assert cache.get("answer2", version=1) == 37
    assert cache.get("answer2", version=2) is None

    cache.set("answer3", 37, version=1)
    cache.set("answer3", 42, version=2)
    assert caches["v2"].delete("answer3") is True
    assert cache.get("answer3", version=1) == 37
    assert cache.get("answer3", version=2) is None

    cache.set("answer4", 37, version=1)
    cache.set("answer4", 42, version=2)
    assert caches["v2"].delete("answer4", version=1) is True
    assert cache.get("answer4", version=1) is None
    assert cache.get("answer4", version=2) == 42


def test_cache_versioning_incr_decr(cache, caches):
    cache.set("answer1", 37, version=1)
    cache.set("answer1", 42, version=2)
    assert cache.incr("answer1") == 38
    assert cache.get("answer1", version=1) == 38
    assert cache.get("answer1", version=2) == 42
    assert cache.decr("answer1") == 37
    assert cache.get("answer1", version=1) == 37
    assert cache.get("answer1", version=2) == 42

    cache.set("answer2", 37, version=1)
    cache.set("answer2", 42, version=2)
    assert cache.incr("answer2", version=2) == 43
    assert cache.get("answer2", version=1) == 37
    assert cache.get("answer2", version=2) == 43
    assert cache.decr("answer2", version=2) == 42
    assert cache.get("answer2", version=1) == 37
    assert cache.get("answer2", version=2) == 42

    cache.set("answer3", 37, version=1)
    cache.set("answer3", 42, version=2)
    assert caches["v2"].incr("answer3") == 43
    assert cache.get("answer3", version=1) == 37
    assert cache.get("answer3", version=2) == 43
    assert caches["v2"].decr("answer3") == 42
    assert cache.get("answer3", version=1) == 37
    assert cache.get("answer3", version=2) == 42

    cache.set("answer4", 37, version=1)
    cache.set("answer4", 42, version=2)
    assert caches["v2"].incr("answer4", version=1) == 38
    assert cache.get("answer4", version=1) == 38
    assert cache.get("answer4", version=2) == 42
    assert caches["v2"].decr("answer4", version=1) == 37
    assert cache.get("answer4", version=1) == 37
    assert cache.get("answer4", version=2) == 42


def test_cache_versioning_get_set_many(cache, caches):
    v2 = caches["v2"]
    cache.set_many({"ford1": 37, "arthur1": 42})
    assert cache.get_many(["ford1", "arthur1"]) == {"ford1": 37, "arthur1": 42}
    assert cache.get_many(["ford1", "arthur1"], version=1) == {"ford1": 37, "arthur1": 42}
    assert cache.get_many(["ford1", "arthur1"], version=2) == {}
    assert v2.get_many(["ford1", "arthur1"]) == {}
    assert v2.get_many(["ford1", "arthur1"], version=1) == {"ford1": 37, "arthur1": 42}
    assert v2.get_many(["ford1", "arthur1"], version=2) == {}

    cache.set_many({"ford2": 37, "arthur2": 42}, version=2)
    assert cache.get_many(["ford2", "arthur2"]) == {}
    assert cache.get_many(["ford2", "arthur2"], version=1) == {}
    assert cache.get_many(["ford2", "arthur2"], version=2) == {"ford2": 37, "arthur2": 42}
    assert v2.get_many(["ford2", "arthur2"]) == {"ford2": 37, "arthur2": 42}
    assert v2.get_many(["ford2", "arthur2"], version=1) == {}
    assert v2.get_many(["ford2", "arthur2"], version=2) == {"ford2": 37, "arthur2": 42}

    v2.set_many({"ford3": 37, "arthur3": 42})
    assert cache.get_many(["ford3", "arthur3"]) == {}
    assert cache.get_many(["ford3", "arthur3"], version=1) == {}
    assert cache.get_many(["ford3", "arthur3"], version=2) == {"ford3": 37, "arthur3": 42}
    assert v2.get_many(["ford3", "arthur3"]) == {"ford3": 37, "arthur3": 42}
    assert v2.get_many(["ford3", "arthur3"], version=1) == {}
    assert v2.get_many(["ford3", "arthur3"], version=2) == {"ford3": 37, "arthur3": 42}

    v2.set_many({"ford4": 37, "arthur4": 42}, version=1)
    assert cache.get_many(["ford4", "arthur4"]) == {"ford4": 37, "arthur4": 42}
    assert cache.get_many(["ford4", "arthur4"], version=1) == {"ford4": 37, "arthur4": 42}
    assert cache.get_many(["ford4", "arthur4"], version=2) == {}
    assert v2.get_many(["ford4", "arthur4"]) == {}
    assert v2.get_many(["ford4", "arthur4"], version=1) == {"ford4": 37, "arthur4": 42}
    assert v2.get_many(["ford4", "arthur4"], version=2) == {}


def test_incr_version(cache, caches):
    cache.set("answer", 42, version=2)
    assert cache.get("answer") is None
    assert cache.get("answer", version=1) is None
    assert cache.get("answer", version=2) == 42
    assert cache.get("answer", version=3) is None

    assert cache.incr_version("answer", version=2) == 3
    assert cache.get("answer") is None
    assert cache.get("answer", version=1) is None
    assert cache.get("answer", version=2) is None
    assert cache.get("answer", version=3) == 42

    caches["v2"].set("answer2", 42)
    assert caches["v2"].get("answer2") == 42
    assert caches["v2"].get("answer2", version=1) is None
    assert caches["v2"].get("answer2", version=2) == 42
    assert caches["v2"].get("answer2", version=3) is None

    assert caches["v2"].incr_version("answer2") == 3
    assert caches["v2"].get("answer2") is None
    assert caches["v2"].get("answer2", version=1) is None
    assert caches["v2"].get("answer2", version=2) is None
    assert caches["v2"].get("answer2", version=3) == 42

    with pytest.raises(ValueError):
        cache.incr_version("does_not_exist")

    cache.set("null", None)
    assert cache.incr_version("null") == 2


def test_decr_version(cache, caches):
    cache.set("answer", 42, version=2)
    assert cache.get("answer") is None
    assert cache.get("answer", version=1) is None
    assert cache.get("answer", version=2) == 42

    assert cache.decr_version("answer", version=2) == 1
    assert cache.get("answer") == 42
    assert cache.get("answer", version=1) == 42
    assert cache.get("answer", version=2) is None

    caches["v2"].set("answer2", 42)
    assert caches["v2"].get("answer2") == 42
    assert caches["v2"].get("answer2", version=1) is None
    assert caches["v2"].get("answer2", version=2) == 42

    assert caches["v2"].decr_version("answer2") == 1
    assert caches["v2"].get("answer2") is None
    assert caches["v2"].get("answer2", version=1) == 42
    assert caches["v2"].get("answer2", version=2) is None

    with pytest.raises(ValueError):
        cache.decr_version("does_not_exist", version=2)

    cache.set("null", None, version=2)
    assert cache.decr_version("null", version=2) == 1


def test_custom_key_func(cache, caches):
    cache.set("answer1", 42)
    assert cache.get("answer1") == 42
    assert caches["custom_key"].get("answer1") is None
    assert caches["custom_key2"].get("answer1") is None

    caches["custom_key"].set("answer2", 42)
    assert cache.get("answer2") is None
    assert caches["custom_key"].get("answer2") == 42
    assert caches["custom_key2"].get("answer2") == 42
    assert "CUSTOM--1-answer2" in caches["custom_key"].fastmmap_cache


def test_cache_write_unpicklable_object(cache):
    from django.http import HttpResponse
    from django.middleware.cache import FetchFromCacheMiddleware, UpdateCacheMiddleware
    from django.test import RequestFactory, override_settings

    def empty_response(request):
        return HttpResponse()

    with override_settings(CACHE_MIDDLEWARE_ALIAS="default"):
        fetch_middleware = FetchFromCacheMiddleware(empty_response)
        request = RequestFactory().get("/cache/test")
        request._cache_update_cache = True
        assert FetchFromCacheMiddleware(empty_response).process_request(request) is None

        content = "Testing cookie serialization."

        def get_response(req):
            response = HttpResponse(content)
            response.set_cookie("foo", "bar")
            return response

        response = UpdateCacheMiddleware(get_response)(request)

        get_cache_data = fetch_middleware.process_request(request)
        assert get_cache_data is not None
        assert get_cache_data.content == content.encode()
        assert get_cache_data.cookies == response.cookies

        UpdateCacheMiddleware(lambda req: get_cache_data)(request)
        get_cache_data = fetch_middleware.process_request(request)
        assert get_cache_data is not None
        assert get_cache_data.content == content.encode()
        assert get_cache_data.cookies == response.cookies


def test_cache_page_serves_the_second_request_from_the_cache(cache):
    from django.http import HttpResponse
    from django.test import RequestFactory
    from django.views.decorators.cache import cache_page

    calls = []

    @cache_page(60)
    def view(request):
        calls.append(1)
        return HttpResponse(f"call {len(calls)}")

    factory = RequestFactory()
    assert view(factory.get("/page")).content == b"call 1"
    assert view(factory.get("/page")).content == b"call 1"
    assert len(calls) == 1


def test_add_fail_on_pickleerror(cache):
    with pytest.raises(pickle.PickleError):
        cache.add("unpicklable", Unpicklable())


def test_set_fail_on_pickleerror(cache):
    with pytest.raises(pickle.PickleError):
        cache.set("unpicklable", Unpicklable())


def test_get_or_set(cache):
    assert cache.get("projector") is None
    assert cache.get_or_set("projector", 42) == 42
    assert cache.get("projector") == 42
    assert cache.get_or_set("null", None) is None
    assert cache.get("null", "default") is None


def test_get_or_set_callable(cache):
    def my_callable():
        return "value"

    assert cache.get_or_set("mykey", my_callable) == "value"
    assert cache.get_or_set("mykey", my_callable()) == "value"
    assert cache.get_or_set("null", lambda: None) is None
    assert cache.get("null", "default") is None


def test_get_or_set_version(cache):
    msg = "get_or_set() missing 1 required positional argument: 'default'"
    assert cache.get_or_set("brian", 1979, version=2) == 1979
    with pytest.raises(TypeError, match=re.escape(msg)):
        cache.get_or_set("brian")
    with pytest.raises(TypeError, match=re.escape(msg)):
        cache.get_or_set("brian", version=1)
    assert cache.get("brian", version=1) is None
    assert cache.get_or_set("brian", 42, version=1) == 42
    assert cache.get_or_set("brian", 1979, version=2) == 1979
    assert cache.get("brian", version=3) is None


def test_get_or_set_racing(cache):
    with mock.patch(f"{BACKEND}.add") as cache_add:
        # add() fails (another process added first): the default is returned.
        cache_add.return_value = False
        assert cache.get_or_set("key", "default") == "default"


@pytest.mark.slow
def test_expiration_real_clock(cache):
    """test_expiration, test_touch, test_set_many_expiration and the touch
    part of test_forever_timeout, against the real clock, in one pass.

    fastmmap keeps whole seconds and rounds expiry times up: an entry with
    timeout t lives at least t and less than t + 1 seconds.
    """
    t0 = time.time()
    for key in ("expire1", "expire2", "expire3"):
        cache.set(key, "very quickly", 1)
    cache.set_many({"key1": "spam", "key2": "eggs"}, 1)
    cache.set("touched", "very quickly", timeout=1)
    assert cache.touch("touched", timeout=3) is True
    cache.set("touched-default", "very quickly", timeout=1)
    assert cache.touch("touched-default") is True  # the default TIMEOUT: 300 s
    cache.set("touched-forever", "belgian fries", timeout=1)
    assert cache.touch("touched-forever", timeout=None) is True
    cache.set("float", "x", 0.4)
    assert cache.touch("nonexistent") is False
    t1 = time.time()

    # Never early: each entry was stored after t0, so it must be there
    # until t0 + its timeout.  A check that a busy machine delayed past
    # that proves nothing either way, and is not made.
    _sleep_until(t0 + 0.35)
    _present_if_before(t0 + 0.4, lambda: cache.get("float") == "x")
    _present_if_before(t0 + 1, lambda: cache.get("expire1") == "very quickly")

    _sleep_until(math.ceil(t1 + 1) + 0.05)  # past every 1 s entry
    assert cache.get("expire1") is None
    assert cache.add("expire2", "newvalue") is True
    assert cache.get("expire2") == "newvalue"
    assert cache.has_key("expire3") is False
    assert cache.get("key1") is None and cache.get("key2") is None
    assert cache.get("float") is None
    _present_if_before(t0 + 3, lambda: cache.has_key("touched") is True)
    assert cache.has_key("touched-default") is True
    assert cache.get("touched-forever") == "belgian fries"

    _sleep_until(math.ceil(t1 + 3) + 0.05)
    assert cache.has_key("touched") is False
    assert cache.has_key("touched-default") is True
    assert cache.get("touched-forever") == "belgian fries"


def _sleep_until(when):
    delay = when - time.time()
    if delay > 0:
        time.sleep(delay)


def _present_if_before(deadline, check):
    """Assert check() if it ran before `deadline` (time.time())."""
    ok = check()
    if time.time() < deadline:
        assert ok, f"gone {deadline - time.time():.2f}s before its time"


# ---------------------------------------------------------------- async


def test_async_methods(cache, caches):
    async def main():
        assert await cache.aset("a", 1) is None
        assert await cache.aget("a") == 1
        assert await cache.aget("missing", "dflt") == "dflt"
        assert await cache.aadd("a", 2) is False
        assert await cache.aadd("b", 2) is True
        assert await cache.ahas_key("b") is True
        assert await cache.aincr("a", 10) == 11
        assert await cache.adecr("a", 1) == 10
        with pytest.raises(ValueError):
            await cache.aincr("missing")
        assert await cache.aset_many({"c": 3, "d": 4}) == []
        assert await cache.aget_many(["a", "c", "d", "missing"]) == {"a": 10, "c": 3, "d": 4}
        assert await cache.atouch("c", None) is True
        assert await cache.adelete("c") is True
        assert await cache.adelete("c") is False
        await cache.adelete_many(["a", "d"])
        assert await cache.aget_many(["a", "d"]) == {}
        assert await cache.aget_or_set("e", lambda: 5) == 5
        assert await cache.aget_or_set("e", 6) == 5
        assert await cache.aincr_version("e") == 2
        assert await cache.aget("e", version=2) == 5
        assert await caches["v2"].aget("e") == 5
        await cache.aclose()
        await cache.aclear()
        assert await cache.aget("b") is None

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_async_incr_is_atomic_across_processes(cache, forked):
    cache.set("n", 0)
    start_at = time.time() + 0.2  # all four children run at once

    def work():
        async def main():
            for _ in range(600):
                await cache.aincr("n")
            await asyncio.gather(*(cache.adecr("n") for _ in range(100)))

        time.sleep(max(0.0, start_at - time.time()))
        asyncio.run(main())

    for child in [forked.start(work) for _ in range(4)]:
        child.result()
    assert cache.get("n") == 2000


# ---------------------------------------------------------------- processes, threads


def _incr_many(alias, key, times, start_at):
    from django.core.cache import caches

    c = caches[alias]
    time.sleep(max(0.0, start_at - time.time()))
    for _ in range(times):
        c.incr(key)
    return os.getpid()


@pytest.mark.timeout(60)
def test_incr_is_atomic_across_processes(cache, forked):
    cache.set("n", 0)
    start_at = time.time() + 0.2  # all four children run at once
    children = [forked.start(_incr_many, "default", "n", 500, start_at) for _ in range(4)]
    pids = {child.result() for child in children}
    assert len(pids) == 4
    assert cache.get("n") == 2000


def test_backend_created_before_fork(caches, forked, cache):
    """gunicorn --preload: the backend object exists in the parent, unopened;
    each worker opens the file itself.  The file outlives the worker that
    created it."""
    fresh = caches["fresh"]
    assert fresh._fmm is None
    fresh_file = fresh._location

    def worker():
        fresh.add("n", 0)
        for _ in range(200):
            fresh.incr("n")
        return fresh.fastmmap_cache.share_file

    children = [forked.start(worker) for _ in range(3)]
    assert {child.result() for child in children} == {fresh_file}
    assert os.path.exists(fresh_file)
    assert fresh.get("n") == 600
    fresh.clear()


def test_values_cross_processes(cache, forked):
    def child():
        from django.core.cache import cache as c

        c.set("from-child", {"pid": os.getpid()})
        return c.get("from-parent")

    cache.set("from-parent", [1, 2, 3])
    assert forked(child) == [1, 2, 3]
    assert cache.get("from-child")["pid"] != os.getpid()


def test_threads_share_one_mapping(cache, caches):
    from django.core.cache import caches as handler

    backends = []
    cache.set("n", 0)

    def work():
        c = handler["default"]
        backends.append(c)
        for _ in range(250):
            c.incr("n")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.get("n") == 1000
    # Django makes one backend object per thread; they share one fastmmap.Cache.
    assert len({id(b) for b in backends}) == 4
    assert len({id(b.fastmmap_cache) for b in backends}) == 1
    assert caches["v2"].fastmmap_cache is caches["default"].fastmmap_cache


# ---------------------------------------------------------------- backend specifics


def test_options_reach_fastmmap(cache, caches):
    fmm = caches["default"].fastmmap_cache
    assert fmm.page_size == PAGE_SIZE and fmm.num_pages == 16
    assert caches["cull"].fastmmap_cache.page_size == PAGE_SIZE  # MAX_ENTRIES ignored


def test_timeouts_map_to_expire_on(cache):
    fmm = cache.fastmmap_cache

    def expire_on(key):
        (entry,) = [e for e in fmm.get_keys(1) if e["key"] == cache.make_key(key)]
        return entry["expire_on"]

    t0 = time.time()
    cache.set("default", 1)
    cache.set("float", 1, 100.2)
    cache.set("never", 1, None)
    cache.set("huge", 1, 10**12)
    cache.set("counter", 1, None)
    cache.incr("counter")
    cache.set("quarter", 1, 0.25)
    t1 = time.time() + 0.001  # expire_on is rounded up to the millisecond, not the second
    assert t0 + 300 <= expire_on("default") <= t1 + 300
    assert t0 + 100.2 <= expire_on("float") <= t1 + 100.2
    assert t0 + 0.25 <= expire_on("quarter") <= t1 + 0.25
    assert expire_on("never") == 0
    assert expire_on("huge") == 2**32 - 1
    # incr() gives the entry the default timeout again (as Django's generic incr()).
    assert t0 + 300 <= expire_on("counter") <= t1 + 300


def test_value_too_big_for_a_page(cache):
    big = os.urandom(PAGE_SIZE * 2)
    cache.set("k", "old")
    cache.set("k", big)
    assert cache.has_key("k") is False  # the old value is not left behind
    assert cache.set_many({"big": big, "small": 1}) == ["big"]
    assert cache.get("small") == 1
    assert cache.add("big2", big) is False
    assert cache.has_key("big2") is False


def test_configuration_errors(tmp_path):
    from django.core.exceptions import ImproperlyConfigured

    from fastmmap.contrib.django import FastMmapCache

    with pytest.raises(ImproperlyConfigured, match="LOCATION"):
        FastMmapCache("", {})
    with pytest.raises(ImproperlyConfigured, match="bogus"):
        FastMmapCache(str(tmp_path / "c"), {"OPTIONS": {"bogus": 1}})
    with pytest.raises(ImproperlyConfigured):
        FastMmapCache(str(tmp_path / "c"), {"OPTIONS": {"anonymous": True}})
    backend = FastMmapCache(str(tmp_path / "c"), {"TIMEOUT": None, "OPTIONS": {"cache_size": "1m"}})
    assert not os.path.exists(tmp_path / "c")  # opened lazily
    backend.set("k", "v")
    assert os.path.exists(tmp_path / "c") and backend.fastmmap_cache.expire_time == 0
    assert backend.default_timeout is None


def test_json_serializer_option(tmp_path):
    from fastmmap.contrib.django import FastMmapCache

    backend = FastMmapCache(str(tmp_path / "j"), {"OPTIONS": {"serializer": "json"}})
    backend.set("k", {"a": [1, 2]})
    assert backend.get("k") == {"a": [1, 2]}
    with pytest.raises(TypeError):
        backend.set("obj", object())
