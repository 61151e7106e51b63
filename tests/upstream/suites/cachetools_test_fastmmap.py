"""cachetools' decorator tests against fastmmap.contrib.cachetools.SharedCache.

Copied by tests/upstream/run.py into cachetools' tests/ package and set up
as cachetools sets up its tests of a plain dict as the cache (DictTest,
DictMethodTest): every test of cached() and cachedmethod() that does not
depend on a maxsize, each cache in a new file.
"""

import os
import tempfile

from fastmmap.contrib.cachetools import SharedCache

from .test_cached import DictTest
from .test_cachedmethod import DictMethodTest

_DIR = tempfile.mkdtemp(prefix="fmm-cachetools-")
_made = []


def _new_cache():
    cache = SharedCache(os.path.join(_DIR, f"c{len(_made)}.cache"), cache_size="1m")
    _made.append(cache)
    return cache


class SharedCacheTest(DictTest):
    def cache(self, minsize):
        return _new_cache()


class SharedCacheMethodTest(DictMethodTest):
    def cache(self, minsize, **_kwargs):
        return _new_cache()


def teardown_module():
    for cache in _made:
        cache.cache.close()
