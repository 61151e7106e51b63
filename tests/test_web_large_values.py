"""Values web applications cache, through the Django and cachelib backends.

A rendered page is often well over 64 KiB.  A backend given no size option
makes a 64 MiB file, whose 2 MiB pages hold items over 1 MiB; a value that
still does not fit is reported (a warning once per size class, or
ItemTooLargeError in debug mode) instead of disappearing silently.
"""

from __future__ import annotations

import logging
import os

import pytest

import fastmmap

PAGE_150K = (b"<p>" + os.urandom(75 * 1024).hex().encode() + b"</p>")  # 150 KiB, incompressible


# ---------------------------------------------------------------- Django


@pytest.fixture(scope="module")
def django_settings():
    django = pytest.importorskip("django")
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            SECRET_KEY="fastmmap-tests",
            ALLOWED_HOSTS=["testserver"],
            USE_TZ=True,
            CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}},
        )
        django.setup()
    return settings


@pytest.fixture
def django_cache(django_settings, tmp_path):
    """with django_cache(OPTIONS, DEBUG=...) as cache: the default cache."""
    from contextlib import contextmanager

    from django.core.cache import caches
    from django.test import override_settings

    @contextmanager
    def use(options=None, debug=False):
        conf = {"BACKEND": "fastmmap.contrib.django.FastMmapCache", "LOCATION": str(tmp_path / "site.cache")}
        if options is not None:
            conf["OPTIONS"] = options
        with override_settings(CACHES={"default": conf}, DEBUG=debug):
            cache = caches["default"]
            try:
                yield cache
            finally:
                cache.fastmmap_cache.close()

    return use


def test_django_per_view_cache_stores_a_150k_page_with_default_options(django_cache):
    from django.http import HttpResponse
    from django.test import RequestFactory
    from django.views.decorators.cache import cache_page

    calls = []

    @cache_page(60)
    def view(request):
        calls.append(1)
        return HttpResponse(PAGE_150K, content_type="text/html")

    with django_cache() as cache:
        first = view(RequestFactory().get("/report"))
        second = view(RequestFactory().get("/report"))
        assert first.content == second.content == PAGE_150K
        assert len(calls) == 1  # the second request was served from the cache
        fmm = cache.fastmmap_cache
        assert (fmm.page_size, fmm.num_pages) == (2 << 20, 43)
        assert fmm.max_item_size > 1 << 20


def test_django_existing_file_keeps_its_geometry(django_cache, tmp_path):
    old = fastmmap.Cache(str(tmp_path / "site.cache"), page_size="16k", num_pages=4, unlink_on_exit=False)
    old["x"] = 1
    old.close()
    with django_cache() as cache:
        fmm = cache.fastmmap_cache
        assert (fmm.page_size, fmm.num_pages, fmm["x"]) == (16384, 4, 1)


def test_django_too_large_warns_once_per_size_class(django_cache, caplog):
    with django_cache({"page_size": "64k", "num_pages": 4}) as cache:
        caplog.set_level(logging.WARNING, logger="fastmmap.contrib")
        cache.set("a", PAGE_150K)
        cache.set("b", PAGE_150K[:-10])  # the same size class
        assert cache.add("c", PAGE_150K) is False
        warnings = [r for r in caplog.records if r.name == "fastmmap.contrib"]
        assert len(warnings) == 1
        assert "does not fit in a page" in warnings[0].getMessage()
        assert "page_size" in warnings[0].getMessage()
        cache.set("d", PAGE_150K * 3)  # a larger class: reported again
        assert len([r for r in caplog.records if r.name == "fastmmap.contrib"]) == 2
        assert cache.get("a") is None and cache.set_many({"e": PAGE_150K, "f": 1}) == ["e"]


def test_django_too_large_raises_under_debug(django_cache):
    with django_cache({"page_size": "64k", "num_pages": 4}, debug=True) as cache:
        cache.set("k", "old")
        with pytest.raises(fastmmap.ItemTooLargeError, match="page_size"):
            cache.set("k", PAGE_150K)
        assert cache.get("k") is None  # the old value is not left behind
        with pytest.raises(fastmmap.ItemTooLargeError):
            cache.add("k2", PAGE_150K)
        cache.set("small", 1)
        assert cache.get("small") == 1


# ---------------------------------------------------------------- cachelib / Flask


def test_cachelib_default_size_stores_a_150k_page(tmp_path):
    pytest.importorskip("cachelib")
    from fastmmap.contrib.cachelib import FastMmapCache

    c = FastMmapCache(str(tmp_path / "c.cache"))
    assert c.set("page", PAGE_150K)
    assert c.get("page") == PAGE_150K
    assert c.fastmmap_cache.page_size == 2 << 20
    c.fastmmap_cache.close()


def test_cachelib_too_large_warns_or_raises(tmp_path, caplog):
    pytest.importorskip("cachelib")
    from fastmmap.contrib.cachelib import FastMmapCache

    caplog.set_level(logging.WARNING, logger="fastmmap.contrib")
    c = FastMmapCache(str(tmp_path / "c.cache"), page_size="64k", num_pages=4)
    assert c.set("a", PAGE_150K) is False
    assert c.set("b", PAGE_150K) is False
    assert len([r for r in caplog.records if r.name == "fastmmap.contrib"]) == 1
    strict = FastMmapCache(str(tmp_path / "d.cache"), page_size="64k", num_pages=4, raise_too_large=True)
    with pytest.raises(fastmmap.ItemTooLargeError):
        strict.set("a", PAGE_150K)
    for x in (c, strict):
        x.fastmmap_cache.close()


def test_flask_debug_app_raises_for_too_large(tmp_path):
    flask = pytest.importorskip("flask")
    pytest.importorskip("flask_caching")
    from fastmmap.contrib.cachelib import FastMmapCache

    for debug in (False, True):
        app = flask.Flask(__name__)
        app.debug = debug
        c = FastMmapCache.factory(app, {}, [], {"share_file": str(tmp_path / f"{debug}.cache"), "page_size": "64k"})
        assert c.raise_too_large is debug
        c.fastmmap_cache.close()
