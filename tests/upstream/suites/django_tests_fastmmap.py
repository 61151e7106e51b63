"""Django's BaseCacheTests against fastmmap.contrib.django.FastMmapCache.

Copied by tests/upstream/run.py into Django's tests/cache/ directory and
run by Django's runtests.py, configured the way Django's tests.py
configures its FileBasedCacheTests: every alias of caches_setting_for_tests
in one place.
"""

import os
import shutil
import tempfile

from django.core.cache import caches
from django.test import TestCase, override_settings

from .tests import BaseCacheTests, caches_setting_for_tests

_DIR = tempfile.mkdtemp(prefix="fmm-django-")


def _settings():
    setting = caches_setting_for_tests(BACKEND="fastmmap.contrib.django.FastMmapCache")
    for params in setting.values():
        # One file for every alias: Django's tests expect the aliases to
        # share their data (one server, or one directory for the file-based
        # cache), told apart by key prefix, version and key function.
        params["LOCATION"] = os.path.join(_DIR, "django.cache")
        # a new dict: caches_setting_for_tests shares Django's own
        params["OPTIONS"] = {**params.get("OPTIONS", {}), "cache_size": "4m"}
    return setting


@override_settings(CACHES=_settings())
class FastMmapCacheTests(BaseCacheTests, TestCase):
    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        caches["default"].clear()
        shutil.rmtree(_DIR, ignore_errors=True)
