"""Flask-Caching's generic backend tests against fastmmap's backend.

Copied by tests/upstream/run.py into Flask-Caching's tests/ directory and
set up the way its test_backend_cache.py sets up its own backends.  The
rest of Flask-Caching's suite reaches the backend through the ``app``
fixture, which tests/upstream/fmm_upstream_plugin.py points at it.
"""

import pytest
from test_backend_cache import GenericCacheTests

from fastmmap.contrib.cachelib import FastMmapCache


class TestFastMmapCache(GenericCacheTests):
    # fastmmap reads the real clock, not the fake one of the "clock" fixture
    _can_use_fast_sleep = False

    @pytest.fixture
    def make_cache(self, tmp_path):
        made = []

        def make(**kwargs):
            cache = FastMmapCache(str(tmp_path / f"c{len(made)}.cache"), cache_size="1m", **kwargs)
            made.append(cache)
            return cache

        yield make
        for cache in made:
            if cache._fmm is not None:
                cache._fmm.close()
