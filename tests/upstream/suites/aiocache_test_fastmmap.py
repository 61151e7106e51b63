"""aiocache's backend-independent acceptance tests against
fastmmap.contrib.aiocache.FastMmapCache.

Copied by tests/upstream/run.py into aiocache's tests/acceptance/ package:
its TestCache, TestRedLock and TestOptimisticLock take the backend from
the ``cache`` fixture (aiocache's conftest parametrizes it over its own
backends); here it is fastmmap's, set up as aiocache's conftest sets up
its memory cache, each test on a new file.
"""

import asyncio

import pytest

from aiocache.lock import RedLock
from fastmmap.contrib.aiocache import FastMmapCache

from ..utils import KEY_LOCK, Keys
from .test_base import TestCache  # noqa: F401
from .test_lock import TestOptimisticLock, TestRedLock  # noqa: F401


@pytest.fixture
async def cache(tmp_path):
    async with FastMmapCache(str(tmp_path / "aiocache.cache"), cache_size="1m", namespace="test") as cache:
        yield cache
        await asyncio.gather(*(cache.delete(k) for k in (*Keys, KEY_LOCK)))
        cache.fastmmap_cache.close()


@pytest.fixture
def lock(cache):
    # test_lock.py's module fixture, which its classes use
    return RedLock(cache, Keys.KEY, 20)
