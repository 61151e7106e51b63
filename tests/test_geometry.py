"""Sizes, geometry, item limits, existing files, permissions."""

from __future__ import annotations

import os
import stat

import pytest

import fastmmap

KIB = 1024
MIB = 1024 * 1024


def test_defaults(cache):
    c = cache()
    assert c.page_size == 64 * KIB
    assert c.num_pages == 89
    assert c.cache_size == 89 * 64 * KIB
    assert c.expire_time == 0


@pytest.mark.parametrize(
    "page_size, expected",
    [
        (1024, 1024),
        (1025, 1024),
        (2047, 1024),
        (4096, 4096),
        (5000, 4096),
        (65535, 32 * KIB),
        ("1k", 1024),
        ("3k", 2 * KIB),
        ("64k", 64 * KIB),
        ("64K", 64 * KIB),
        ("1m", MIB),
        ("1M", MIB),
        ("1500k", MIB),
    ],
)
def test_page_size_rounds_down_to_a_power_of_two(cache, page_size, expected):
    c = cache(page_size=page_size, num_pages=1)
    assert c.page_size == expected
    assert c.cache_size == expected


@pytest.mark.parametrize(
    "opts, page_size, num_pages",
    [
        # cache_size alone: 64 KiB pages, num_pages from Perl's 89 -> (n-1)/2 / 2n+1 walk.
        ({"cache_size": "1k"}, 64 * KIB, 1),
        ({"cache_size": "64k"}, 64 * KIB, 3),
        ({"cache_size": "1m"}, 64 * KIB, 21),
        ({"cache_size": "10m"}, 64 * KIB, 179),
        ({"cache_size": 10 * MIB}, 64 * KIB, 179),
        # cache_size with page_size: same walk with that page size.
        ({"cache_size": "1m", "page_size": "128k"}, 128 * KIB, 9),
        # cache_size with num_pages: page_size = pow2 floor of the quotient, min 4 KiB.
        ({"cache_size": "1m", "num_pages": 7}, 128 * KIB, 7),
        ({"cache_size": "1m", "num_pages": 16}, 64 * KIB, 16),
        ({"cache_size": "64k", "num_pages": 89}, 4 * KIB, 89),
        # page_size and num_pages.
        ({"page_size": 4096, "num_pages": 7}, 4 * KIB, 7),
        ({"num_pages": 5}, 64 * KIB, 5),
    ],
    ids=repr,
)
def test_cache_size_rules_follow_cache_fastmmap(cache, opts, page_size, num_pages):
    c = cache(**opts)
    assert (c.page_size, c.num_pages) == (page_size, num_pages)
    assert c.cache_size == page_size * num_pages


def test_smallest_page_works(cache):
    c = cache(page_size=1024, num_pages=2)
    for i in range(50):
        assert c.set(f"k{i}", i) is True
    assert c["k49"] == 49


@pytest.mark.parametrize("page_size", [1024, 4096, 65536])
def test_item_size_limits(cache, page_size):
    """Perl t/1: a value larger than a page can never be stored; half a page can."""
    c = cache(page_size=page_size, num_pages=1)
    half = b"h" * (page_size // 4 if page_size == 1024 else page_size // 2)
    assert c.set("half", half) is True
    assert c["half"] == half
    assert c.set("page", b"p" * page_size) is False
    assert c.set("k" * page_size, b"") is False  # an oversize key
    assert c.get("k" * page_size) is None
    assert c.exists("k" * page_size) is False
    assert c["half"] == half


def test_64k_value_and_key_do_not_fit_default_pages(cache):
    """Perl t/1: 64 KB key or value in a 64 KB page: set is false."""
    c = cache(num_pages=3)
    assert c.set("big", "v" * 65536) is False
    assert c.set("k" * 65536, "v") is False
    assert c.set("fits", "v" * 60000) is True
    assert c["fits"] == "v" * 60000
    assert c.set("k" * 1024, "v" * 1024) is True


# ---------------------------------------------------------------- existing files


def test_existing_geometry_is_adopted(cache):
    path = cache.path()
    a = cache(path, page_size=4096, num_pages=7, expire_time=10)
    a["k"] = "v"
    b = cache(path)
    assert (b.page_size, b.num_pages, b.cache_size) == (4096, 7, 4096 * 7)
    assert b["k"] == "v"
    b["k2"] = "v2"
    assert a["k2"] == "v2"


def test_agreeing_size_options_are_fine(cache):
    path = cache.path()
    a = cache(path, page_size=4096, num_pages=7)
    a["k"] = "v"
    b = cache(path, page_size=4096, num_pages=7)
    assert b["k"] == "v"
    c = cache(path, page_size="4k")
    assert c.num_pages == 7 and c["k"] == "v"
    d = cache(path, num_pages=7)
    assert d.page_size == 4096 and d["k"] == "v"


@pytest.mark.parametrize(
    "opts",
    [{"page_size": 8192}, {"num_pages": 8}, {"page_size": 4096, "num_pages": 9}, {"cache_size": "1m"}],
    ids=repr,
)
def test_conflicting_size_options_raise_and_keep_the_file(cache, opts):
    path = cache.path()
    a = cache(path, page_size=4096, num_pages=7)
    a["k"] = "v"
    size = os.path.getsize(path)
    with pytest.raises(ValueError):
        fastmmap.Cache(path, **opts)
    assert os.path.getsize(path) == size
    assert a["k"] == "v"
    b = cache(path)
    assert (b.page_size, b.num_pages) == (4096, 7)
    assert b["k"] == "v"


def test_conflicting_size_options_with_init_file_reinitialise(cache):
    path = cache.path()
    a = cache(path, page_size=4096, num_pages=7, unlink_on_exit=False)
    a["k"] = "v"
    a.close()
    b = cache(path, page_size=8192, num_pages=3, init_file=True)
    assert (b.page_size, b.num_pages) == (8192, 3)
    assert "k" not in b and len(b) == 0
    c = cache(path)
    assert (c.page_size, c.num_pages) == (8192, 3)


def test_init_file_with_same_geometry_empties(cache):
    path = cache.path()
    a = cache(path, num_pages=3)
    a["k"] = "v"
    b = cache(path, num_pages=3, init_file=True)
    assert len(b) == 0
    b["new"] = 1
    assert cache(path)["new"] == 1


def test_init_file_without_size_options_keeps_geometry(cache):
    path = cache.path()
    a = cache(path, page_size=4096, num_pages=5, unlink_on_exit=False)
    a["k"] = "v"
    a.close()
    b = cache(path, init_file=True)
    assert len(b) == 0
    assert (b.page_size, b.num_pages) == (4096, 5)
    b["x"] = 1
    assert b["x"] == 1


def test_start_slots_is_accepted(cache):
    path = cache.path()
    a = cache(path, num_pages=2, page_size=8192, start_slots=16)
    for i in range(300):
        a.set(f"k{i}", i)
    assert a.get("k299") == 299
    assert cache(path).get("k299") == 299


# ---------------------------------------------------------------- hash spread

# Little-endian, the first word that zeroes the short-key hash's first
# multiply if that word is not seeded: every 9..16-byte key starting with it
# would then have one hash per key length in every file.
COLLIDING_PREFIX = (0xA0761D6478BD642F).to_bytes(8, "little")


@pytest.mark.parametrize("run", range(3))  # three files, three random seeds
def test_keys_sharing_a_first_word_spread_over_the_pages(cache, run):
    c = cache(page_size="64k", num_pages=64)
    keys = [COLLIDING_PREFIX + (i // 8).to_bytes(1 + i % 8, "little") for i in range(2000)]  # 9..16 bytes
    assert len(set(keys)) == len(keys)
    for k in keys:
        c.set(k, b"v")
    live = [c._page_info(p)["live"] for p in range(c.num_pages)]
    assert sum(live) == len(keys), "keys were evicted: they piled onto few pages"
    # 31 keys a page on average; a uniform hash puts more than 100 on one
    # page with a probability far below 1e-15
    assert max(live) <= 100, live
    assert all(k in c for k in keys)


# ---------------------------------------------------------------- permissions


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_created_files_are_0600_by_default(cache):
    c = cache(num_pages=1)
    assert mode_of(c.share_file) == 0o600


def test_temp_file_is_0600(cache):
    c = cache(None, num_pages=1)
    assert mode_of(c.share_file) == 0o600


@pytest.mark.parametrize("perms", [0o600, 0o640, 0o644, 0o660, 0o666])
def test_permissions_are_honoured_exactly(cache, perms):
    old = os.umask(0o077)  # a restrictive umask must not change the mode
    try:
        c = cache(num_pages=1, permissions=perms)
    finally:
        os.umask(old)
    assert mode_of(c.share_file) == perms


def test_permissions_of_an_existing_file_are_left_alone(cache):
    path = cache.path()
    cache(path, num_pages=1, permissions=0o644)
    cache(path, permissions=0o600)
    assert mode_of(path) == 0o644


def test_share_file_property(cache, tmp_path):
    path = cache.path()
    c = cache(path, num_pages=1)
    assert os.fspath(c.share_file) == path
    assert os.path.exists(path)
