"""Tests for fastmmap._options: option parsing and Cache::FastMmap sizing."""

import datetime
import math
import re

import pytest
from hypothesis import given, settings

import fastmmap
from hypothesis import strategies as st

from fastmmap import _options as o
from fastmmap._options import (
    EXPIRE_NOW,
    MAX_EXPIRE_TIME,
    MAX_NUM_PAGES,
    MAX_PAGE_SIZE,
    MIN_PAGE_SIZE,
    compute_geometry,
    parse_expire_time,
    parse_lock_timeout,
    parse_permissions,
    parse_size,
    parse_start_slots,
)

K = 1024
M = 1024 * 1024
G = 1024 * M


def test_constants():
    assert o.DEFAULT_PAGE_SIZE == 65536
    assert o.DEFAULT_NUM_PAGES == 89
    assert o.DEFAULT_START_SLOTS == 89
    assert o.EXPIRE_NOW == -1
    assert o.MIN_PAGE_SIZE == 1024
    assert o.MAX_PAGE_SIZE == 1 << 30
    assert o.MAX_NUM_PAGES == 1 << 24


# ---------------------------------------------------------------- parse_size


@pytest.mark.parametrize(
    "value, expected",
    [
        (0, 0),
        (1, 1),
        (4096, 4096),
        (1 << 40, 1 << 40),
        ("0", 0),
        ("4096", 4096),
        ("4096b", 4096),
        ("4096B", 4096),
        ("64k", 64 * K),
        ("64K", 64 * K),
        ("64kb", 64 * K),
        ("64KB", 64 * K),
        ("64kib", 64 * K),
        ("64KiB", 64 * K),
        ("1m", M),
        ("1M", M),
        ("1mb", M),
        ("1MiB", M),
        ("2g", 2 * G),
        ("2GB", 2 * G),
        ("2gib", 2 * G),
        ("  64k  ", 64 * K),
        ("64 k", 64 * K),
        ("\t1m\n", M),
        ("007k", 7 * K),
    ],
)
def test_parse_size_good(value, expected):
    result = parse_size(value, "cache_size")
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize(
    "value",
    [1.0, 65536.0, True, False, None, [1], b"64k", bytearray(b"1"), object()],
)
def test_parse_size_wrong_type(value):
    with pytest.raises(TypeError, match=r"page_size must be an int or a size string"):
        parse_size(value, "page_size")


def test_parse_size_type_message_shows_value():
    with pytest.raises(
        TypeError,
        match=r"^page_size must be an int or a size string like '64k', got \[1\]$",
    ):
        parse_size([1], "page_size")


@pytest.mark.parametrize(
    "value",
    [
        "",
        " ",
        "k",
        "64x",
        "64kk",
        "64t",
        "1.5m",
        "-1",
        "-64k",
        "+64k",
        "64 k b",
        "64ib",
        "64 kbb",
        "1e6",
        "0x100",
        "1_000",
        "64k 1",
        "\uff16\uff14k",  # full-width digits
        "1" * 50,
    ],
)
def test_parse_size_bad_string(value):
    with pytest.raises(ValueError, match=r"^cache_size "):
        parse_size(value, "cache_size")


def test_parse_size_bad_string_message_shows_value():
    with pytest.raises(ValueError, match=r"cache_size must be a size like .*got '64x'"):
        parse_size("64x", "cache_size")


@pytest.mark.parametrize("value", [-1, -65536])
def test_parse_size_negative(value):
    with pytest.raises(ValueError, match=rf"num_bytes must be >= 0, got {value}"):
        parse_size(value, "num_bytes")


def test_parse_size_int_subclass():
    class MyInt(int):
        pass

    assert parse_size(MyInt(5), "x") == 5
    assert type(parse_size(MyInt(5), "x")) is int


# ---------------------------------------------------------- parse_expire_time


@pytest.mark.parametrize(
    "value, expected",
    [
        (0, 0),
        (1, 1),
        (30, 30),
        (3600, 3600),
        (MAX_EXPIRE_TIME, MAX_EXPIRE_TIME),
        (0.0, 0),
        (0.2, 1),
        (1.0, 1),
        (1.5, 2),
        (29.000001, 30),
        (datetime.timedelta(0), 0),
        (datetime.timedelta(seconds=30), 30),
        (datetime.timedelta(minutes=5), 300),
        (datetime.timedelta(days=2, seconds=3), 2 * 86400 + 3),
        (datetime.timedelta(microseconds=1), 1),
        (datetime.timedelta(seconds=1, milliseconds=500), 2),
        ("0", 0),
        ("30", 30),
        ("30s", 30),
        ("30S", 30),
        ("30 s", 30),
        (" 30s ", 30),
        ("5m", 300),
        ("5M", 300),
        ("2h", 7200),
        ("1d", 86400),
        ("1w", 604800),
        ("2W", 2 * 604800),
        ("never", 0),
        ("NEVER", 0),
        (" never ", 0),
        ("now", EXPIRE_NOW),
        ("Now", EXPIRE_NOW),
    ],
)
def test_parse_expire_time_good(value, expected):
    result = parse_expire_time(value)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize(
    "value, expected",
    [
        (0.25, 250),
        (0.0001, 1),  # a fraction of a millisecond rounds up
        (1.5, 1500),
        (2, 2000),
        (0, 0),
        (0.0, 0),
        (datetime.timedelta(milliseconds=250), 250),
        (datetime.timedelta(microseconds=1), 1),
        (datetime.timedelta(days=1), 86_400_000),
        ("5m", 300_000),
        ("never", 0),
        ("now", o.EXPIRE_NOW),
        (o.MAX_EXPIRE_TIME, o.MAX_EXPIRE_TIME * 1000),
    ],
)
def test_parse_expire_time_ms(value, expected):
    result = o.parse_expire_time_ms(value)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize("value", [-0.25, float("nan"), float("inf"), "1ms", None, o.MAX_EXPIRE_TIME + 0.5])
def test_parse_expire_time_ms_refuses_what_parse_expire_time_does(value):
    with pytest.raises((TypeError, ValueError)) as err:
        parse_expire_time(value)
    with pytest.raises(err.type, match=re.escape(str(err.value))):
        o.parse_expire_time_ms(value)


@pytest.mark.parametrize(
    "value",
    [None, True, False, [30], b"30s", object(), 1j, datetime.datetime(2030, 1, 1)],
)
def test_parse_expire_time_wrong_type(value):
    with pytest.raises(TypeError, match=r"^expire_time must be an int, float"):
        parse_expire_time(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "  ",
        "garbage",
        "1 month",  # Perl reads this as 60 s
        "1 minute",  # Perl reads this as 60 s
        "5mins",
        "1y",
        "1ms",
        "-5",
        "-5s",
        "+5",
        "1.5h",
        "5 m s",
        "s",
        "nevermore",
        "now!",
        "1e3",
        "\uff15m",  # full-width digit
    ],
)
def test_parse_expire_time_bad_string(value):
    with pytest.raises(ValueError, match=r"^expire_time must be seconds or a string like"):
        parse_expire_time(value)


@pytest.mark.parametrize("value", [-1, -3600, -0.5, -1e-9, datetime.timedelta(seconds=-1)])
def test_parse_expire_time_negative(value):
    with pytest.raises(ValueError, match=r"expire_time must be >= 0 seconds"):
        parse_expire_time(value)


def test_parse_expire_time_nan():
    with pytest.raises(ValueError, match=r"expire_time must be a number of seconds"):
        parse_expire_time(math.nan)


@pytest.mark.parametrize(
    "value",
    [
        MAX_EXPIRE_TIME + 1,
        float(MAX_EXPIRE_TIME) + 0.5,
        math.inf,
        1e300,
        2**32,
        2**100,
        datetime.timedelta(days=100 * 366),
        datetime.timedelta.max,
        "100000w",
        "1" * 30 + "s",
        "9" * 60,
    ],
)
def test_parse_expire_time_too_large(value):
    with pytest.raises(ValueError, match=r"expire_time (must be at most|is too large)"):
        parse_expire_time(value)


def test_parse_expire_time_bound_fits_u32_for_decades():
    # now + the bound must fit u32 absolute seconds (Feb 2106) until 2050 at least.
    year_2050 = int(datetime.datetime(2050, 1, 1, tzinfo=datetime.timezone.utc).timestamp())
    assert year_2050 + MAX_EXPIRE_TIME < 2**32
    # ... and it is generous: 30 years are allowed.
    assert parse_expire_time(f"{30 * 52}w") == 30 * 52 * 604800


def test_parse_expire_time_name_in_messages():
    with pytest.raises(ValueError, match=r"^ttl must be seconds or a string"):
        parse_expire_time("bogus", "ttl")
    with pytest.raises(TypeError, match=r"^ttl must be"):
        parse_expire_time(None, "ttl")
    with pytest.raises(ValueError, match=r"^ttl must be >= 0"):
        parse_expire_time(-1, "ttl")


# ----------------------------------------------------------- compute_geometry


def test_geometry_none_given():
    assert compute_geometry() is None
    assert compute_geometry(None, None, None) is None


# Cache::FastMmap's behaviour, measured (reference section 1.14) and checked
# against FastMmap.pm 1.43 `sub new` run under perl.
@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"cache_size": "1k"}, (65536, 1)),
        ({"cache_size": "64k"}, (65536, 3)),
        ({"cache_size": "1m"}, (65536, 21)),
        ({"cache_size": "10m"}, (65536, 179)),
        ({"cache_size": "100m", "page_size": "64k"}, (65536, 2879)),
        ({"cache_size": "1m", "num_pages": 7}, (131072, 7)),
        # more values from the Perl code
        ({"cache_size": 1000}, (65536, 1)),
        ({"cache_size": 65535}, (65536, 1)),
        ({"cache_size": 65536}, (65536, 3)),
        ({"cache_size": 65537}, (65536, 3)),
        ({"cache_size": "16m"}, (65536, 359)),
        ({"cache_size": 89 * 65536}, (65536, 179)),  # the default size
        ({"cache_size": 89 * 65536 - 1}, (65536, 89)),
        ({"cache_size": 5 * 65536}, (65536, 9)),
        ({"cache_size": "2m"}, (65536, 43)),
        ({"cache_size": 43 * 65536 + 32768}, (65536, 43)),  # a little under the ask
        ({"cache_size": "1m", "page_size": "4k"}, (4096, 359)),
        ({"cache_size": "1m", "page_size": "1k"}, (4096, 359)),  # Perl's 4096 floor
        ({"cache_size": "1k", "num_pages": 1}, (4096, 1)),  # Perl's 4096 floor
        ({"cache_size": "1m", "num_pages": 16}, (65536, 16)),
        ({"cache_size": "1m", "num_pages": 17}, (32768, 17)),
        ({"page_size": "4k", "num_pages": 10}, (4096, 10)),
        ({"page_size": 1000 * 1000}, (524288, 89)),
        ({"page_size": "1k"}, (1024, 89)),
        ({"num_pages": 1000}, (65536, 1000)),
        ({"num_pages": 1}, (65536, 1)),
    ],
)
def test_geometry_table(kwargs, expected):
    assert compute_geometry(**kwargs) == expected


# From 64 MiB up, cache_size alone gets 2 MiB pages (Perl: 64 KiB), with the
# same page-count walk; page_size or num_pages given keeps Perl's rule.
@pytest.mark.parametrize(
    "cache_size, expected",
    [
        ("63m", (65536, 1439)),
        ("64m", (2 << 20, 43)),
        ("100m", (2 << 20, 89)),
        ("128m", (2 << 20, 89)),
        ("256m", (2 << 20, 179)),
        ("1g", (2 << 20, 719)),
    ],
)
def test_geometry_large_caches_get_2m_pages(cache_size, expected):
    assert compute_geometry(cache_size) == expected
    assert compute_geometry(cache_size, "64k")[0] == 65536
    assert compute_geometry(cache_size, None, 1000)[1] == 1000


@pytest.mark.parametrize("cache_size", ["64m", "100m", "1g"])
def test_large_default_cache_stores_a_1mib_item(cache, cache_size):
    c = cache(cache_size=cache_size)
    assert c.max_item_size >= (1 << 20) + 1024
    assert c.num_pages >= 43
    big = b"x" * (1 << 20)
    assert c.set("page", big)
    assert c["page"] == big


def test_file_of_the_64k_default_is_adopted(tmp_path):
    """A 64 MiB cache made before the 2 MiB default (64 KiB pages) reopens
    with the same cache_size and keeps its entries, instead of GeometryError."""
    path = str(tmp_path / "old.cache")
    old = fastmmap.Cache(path, cache_size="64m", page_size="64k", unlink_on_exit=False)
    old["k"] = "v"
    old.close()
    c = fastmmap.Cache(path, cache_size="64m")
    assert (c.page_size, c.num_pages, c["k"]) == (65536, 1439, "v")
    c.close()
    with pytest.raises(fastmmap.GeometryError):
        fastmmap.Cache(path, cache_size="200m")
    c = fastmmap.Cache(path, cache_size="64m", init_file=True)
    assert (c.page_size, c.num_pages, c.get("k")) == (2 << 20, 43, None)
    c.close()


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        # Perl leaves page_size unrounded on this path; fastmmap rounds it down.
        ({"cache_size": "1m", "page_size": 5000}, (4096, 359)),
        ({"cache_size": "1m", "page_size": 100000}, (65536, 21)),
        ({"page_size": 65537}, (65536, 89)),
        ({"page_size": 131071}, (65536, 89)),
        ({"page_size": MAX_PAGE_SIZE}, (MAX_PAGE_SIZE, 89)),
        ({"page_size": MIN_PAGE_SIZE, "num_pages": MAX_NUM_PAGES}, (1024, 1 << 24)),
    ],
)
def test_geometry_page_size_rounded_down_everywhere(kwargs, expected):
    assert compute_geometry(**kwargs) == expected


def test_geometry_all_three_agree():
    assert compute_geometry("1m", "64k", 16) == (65536, 16)
    assert compute_geometry(M, 65536, 16) == (65536, 16)
    # rounding happens before the comparison
    assert compute_geometry("1m", 65537, 16) == (65536, 16)


@pytest.mark.parametrize(
    "args",
    [("1m", "64k", 17), ("1m", "32k", 16), (1000000, "64k", 16), ("1m", 100000, 10)],
)
def test_geometry_all_three_disagree(args):
    with pytest.raises(ValueError, match=r"does not equal page_size \* num_pages"):
        compute_geometry(*args)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"page_size": 1000}, r"page_size=1000 gives page_size 512; .*between 1024"),
        ({"page_size": "512"}, r"gives page_size 512"),
        ({"page_size": 1}, r"gives page_size 1;"),
        ({"page_size": "2g"}, r"gives page_size 2147483648; .*1073741824 \(1 GiB\)"),
        ({"page_size": 0}, r"page_size must be > 0"),
        ({"cache_size": "1m", "page_size": 0}, r"page_size must be > 0"),
        ({"cache_size": "1m", "page_size": "2g"}, r"gives page_size 2147483648"),
        (
            {"cache_size": 4 * G, "num_pages": 2},
            r"cache_size=4294967296 with num_pages=2 gives page_size 2147483648",
        ),
        ({"num_pages": 0}, r"num_pages must be between 1 and 16777216, got 0"),
        ({"num_pages": -3}, r"num_pages must be between 1 and 16777216, got -3"),
        ({"num_pages": MAX_NUM_PAGES + 1}, r"num_pages must be between 1 and"),
        ({"cache_size": 0}, r"cache_size must be > 0"),
        ({"cache_size": "0k"}, r"cache_size must be > 0"),
        (
            {"cache_size": 1 << 50},
            r"cache_size=1125899906842624 \(2097152-byte pages\) gives num_pages "
            r"\d+; num_pages must be between 1 and 16777216",
        ),
        ({"cache_size": "1x"}, r"cache_size must be a size like"),
        ({"page_size": "-1"}, r"page_size must be a size like"),
        ({"cache_size": -1}, r"cache_size must be >= 0"),
        (
            {"cache_size": "1m", "page_size": "64k", "num_pages": 0},
            r"num_pages must be between",
        ),
        ({"cache_size": "1m", "page_size": 512, "num_pages": 2048}, r"gives page_size 512"),
    ],
)
def test_geometry_bad_values(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        compute_geometry(**kwargs)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"num_pages": "89"}, r"num_pages must be an int, got '89'"),
        ({"num_pages": 8.0}, r"num_pages must be an int"),
        ({"num_pages": True}, r"num_pages must be an int"),
        ({"page_size": 4096.0}, r"page_size must be an int or a size string"),
        ({"cache_size": [1]}, r"cache_size must be an int or a size string"),
        ({"cache_size": True}, r"cache_size must be an int or a size string"),
    ],
)
def test_geometry_wrong_types(kwargs, pattern):
    with pytest.raises(TypeError, match=pattern):
        compute_geometry(**kwargs)


def _perl_geometry(cache_size, page_size, num_pages):
    """FastMmap.pm 1.43 `sub new` sizing, transliterated; ints only."""
    if cache_size:
        if num_pages:
            ps = max(
                1 << ((cache_size // num_pages).bit_length() - 1) if cache_size >= num_pages else 0,
                4096,
            )
            return ps, num_pages
        ps = max(page_size or 65536, 4096)
        n = 89
        if n * ps <= cache_size:
            while n * ps <= cache_size:
                n = n * 2 + 1
        else:
            while n * ps > cache_size:
                n = (n - 1) // 2
            n = n * 2 + 1
        return ps, n
    n = num_pages or 89
    ps = page_size or 65536
    return 1 << (ps.bit_length() - 1), n


@settings(max_examples=300, deadline=None)
@given(
    cache_size=st.one_of(st.none(), st.integers(1, 1 << 36)),
    page_shift=st.one_of(st.none(), st.integers(12, 30)),
    num_pages=st.one_of(st.none(), st.integers(1, 100000)),
)
def test_geometry_matches_perl(cache_size, page_shift, num_pages):
    # Power-of-two page sizes >= 4096 and at most two options: the region
    # where fastmmap and Perl must agree exactly.
    page_size = None if page_shift is None else 1 << page_shift
    if cache_size is not None and page_size is not None and num_pages is not None:
        num_pages = None
    try:
        got = compute_geometry(cache_size, page_size, num_pages)
    except ValueError:
        ps, n = _perl_geometry(cache_size, page_size, num_pages)
        assert not (MIN_PAGE_SIZE <= ps <= MAX_PAGE_SIZE and 1 <= n <= MAX_NUM_PAGES)
        return
    if got is None:
        got = (o.DEFAULT_PAGE_SIZE, o.DEFAULT_NUM_PAGES)
    if cache_size is not None and page_size is None and num_pages is None and cache_size >= o.LARGE_CACHE_SIZE:
        # the one deliberate difference: 2 MiB pages, then Perl's walk
        assert got == _perl_geometry(cache_size, o.LARGE_PAGE_SIZE, None)
        return
    assert got == _perl_geometry(cache_size, page_size, num_pages)


@settings(max_examples=300, deadline=None)
@given(cache_size=st.integers(1, 1 << 39))
def test_geometry_cache_size_alone_walks_perls_sequence(cache_size):
    ps, n = compute_geometry(cache_size=cache_size)
    assert ps == (65536 if cache_size < 64 << 20 else 2 << 20)
    # Perl walks down from 89 by n -> (n - 1) // 2 (44, 21, 10, 4, 1, 0) to
    # the first value that fits, then steps back up once by 2n + 1; or up
    # from 89 by 2n + 1 (179, 359, ...) to the first value that does not fit.
    allowed = {1, 3, 9, 21, 43, 89}
    up = 89
    while up < n:
        up = up * 2 + 1
        allowed.add(up)
    assert n in allowed
    assert ((n - 1) // 2) * ps <= cache_size < (n + 1) * ps


@settings(max_examples=300, deadline=None)
@given(
    page_size=st.integers(MIN_PAGE_SIZE, 4 * MAX_PAGE_SIZE),
    num_pages=st.one_of(st.none(), st.integers(1, MAX_NUM_PAGES)),
)
def test_geometry_page_size_is_power_of_two(page_size, num_pages):
    try:
        ps, n = compute_geometry(page_size=page_size, num_pages=num_pages)
    except ValueError:
        assert page_size >= 2 * MAX_PAGE_SIZE
        return
    assert ps & (ps - 1) == 0
    assert ps <= page_size < 2 * ps
    assert MIN_PAGE_SIZE <= ps <= MAX_PAGE_SIZE


# ------------------------------------------------------------- start_slots


@pytest.mark.parametrize("value", [None, 1, 10, 89, 128, 500, 1 << 20])
def test_parse_start_slots_good(value):
    assert parse_start_slots(value) == value


@pytest.mark.parametrize("value", [0, -1, (1 << 20) + 1, 1 << 40])
def test_parse_start_slots_range(value):
    with pytest.raises(
        ValueError, match=rf"start_slots must be between 1 and 1048576, got {value}"
    ):
        parse_start_slots(value)


@pytest.mark.parametrize("value", [True, False, 89.0, "89", b"89", [89]])
def test_parse_start_slots_type(value):
    with pytest.raises(TypeError, match=r"start_slots must be an int"):
        parse_start_slots(value)


# -------------------------------------------------------------- permissions


@pytest.mark.parametrize("value", [1, 0o600, 0o640, 0o666, 0o777, 0o7777])
def test_parse_permissions_good(value):
    assert parse_permissions(value) == value


def test_parse_permissions_refuses_0():
    # applied exactly, 0 would make a file no one but root can open
    with pytest.raises(ValueError, match=r"^permissions=0 would create a file that no process but root's can open"):
        parse_permissions(0)


@pytest.mark.parametrize(
    "value, pattern",
    [(-1, r"got -1$"), (0o10000, r"got 4096 \(0o10000\)"), (1 << 40, r"got 1099511627776")],
)
def test_parse_permissions_range(value, pattern):
    with pytest.raises(ValueError, match=r"^permissions must be between 1 and 0o7777, " + pattern):
        parse_permissions(value)


@pytest.mark.parametrize("value", [None, True, "0600", "rw-------", 384.0, b"\x01"])
def test_parse_permissions_type(value):
    with pytest.raises(TypeError, match=r"permissions must be an int such as 0o600"):
        parse_permissions(value)


# ------------------------------------------------------------- lock_timeout


@pytest.mark.parametrize(
    "value, expected",
    [(None, None), (1, 1.0), (0.001, 0.001), (2.5, 2.5), (3600, 3600.0), (2**31 - 1, 2**31 - 1.0)],
)
def test_parse_lock_timeout_good(value, expected):
    result = parse_lock_timeout(value)
    assert result == expected
    if expected is not None:
        assert type(result) is float


@pytest.mark.parametrize("value", [0, 0.0, -1, -0.5, math.nan, -math.inf])
def test_parse_lock_timeout_not_positive(value):
    with pytest.raises(ValueError, match=r"lock_timeout must be a number of seconds > 0, or None"):
        parse_lock_timeout(value)


@pytest.mark.parametrize("value", [math.inf, 1e300, 2**31, 2**200, 10**400])
def test_parse_lock_timeout_too_large(value):
    with pytest.raises(ValueError, match=r"lock_timeout must be at most 2147483647 seconds"):
        parse_lock_timeout(value)


@pytest.mark.parametrize("value", [True, False, "1", "1s", [1], datetime.timedelta(seconds=1)])
def test_parse_lock_timeout_type(value):
    with pytest.raises(TypeError, match=r"lock_timeout must be a number of seconds or None"):
        parse_lock_timeout(value)


def test_every_helper_has_a_docstring():
    for fn in (
        parse_size,
        parse_expire_time,
        compute_geometry,
        parse_start_slots,
        parse_permissions,
        parse_lock_timeout,
    ):
        assert fn.__doc__ and len(fn.__doc__.strip()) > 40, fn.__name__
