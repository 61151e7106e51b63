"""cachelib's shared backend tests against fastmmap.contrib.cachelib.FastMmapCache.

Copied by tests/upstream/run.py into cachelib's tests/ directory (its
mixins import each other by module name from there), and set up the way
cachelib's own test_redis_cache.py sets up RedisCache: the backend as
shipped and a subclass with a non-default serializer, each with and
without a key prefix.  After each test, the values in the file of a cache
with a serializer must be that serializer's bytes.
"""

import os
import shutil
import tempfile

import pytest
from clear import ClearTests
from common import CommonTests
from delete_many_with_prefix import DeleteManyWithPrefixTests
from has import HasTests
from serializer import SerializerTests

from cachelib.serializers import BaseSerializer
from fastmmap.contrib.cachelib import FastMmapCache

# the backend's default, which stores values as fastmmap.Cache does (None
# before there was one)
_NATIVE = type(getattr(FastMmapCache, "serializer", None))


class SillySerializer(BaseSerializer):
    """A pointless serializer only for testing (as in cachelib's tests)."""

    def dumps(self, value):
        return repr(value).encode()

    def loads(self, bvalue):
        return eval(bvalue.decode())


class CustomCache(FastMmapCache):
    """The backend with a non-default serializer, as cachelib tests its own."""

    serializer = SillySerializer()


@pytest.fixture(autouse=True, params=[FastMmapCache, CustomCache])
def cache_factory(request, key_prefix):
    directory = tempfile.mkdtemp(prefix="fmm-cachelib-")
    made = []

    def _factory(self, *args, **kwargs):
        kwargs.setdefault("key_prefix", key_prefix)
        # a new file for each cache: every test starts from an empty one
        path = os.path.join(directory, f"c{len(made)}.cache")
        cache = request.param(path, *args, cache_size="1m", **kwargs)
        made.append(cache)
        return cache

    request.cls.cache_factory = _factory
    yield
    for cache in made:
        if cache._fmm is None:
            continue
        serializer = cache.serializer
        if type(serializer) is not _NATIVE:
            # cachelib's SerializerTests only read values back, which passes
            # even if the serializer is ignored: check that the file holds
            # the serializer's bytes
            for key, raw in cache._fmm.items():
                assert isinstance(raw, bytes), f"{key!r}: {raw!r} was not stored through {serializer!r}"
                serializer.loads(raw)
        cache._fmm.close()
    shutil.rmtree(directory, ignore_errors=True)


class TestFastMmapCache(CommonTests, ClearTests, HasTests, DeleteManyWithPrefixTests, SerializerTests):
    pass
