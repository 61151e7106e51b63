"""Parsing and validation of fastmmap.Cache constructor options.

Pure Python, no dependency on the C extension: Cache.__init__ turns the
user's many, loosely typed options into a small, fixed set of plain ints
and floats, and the C type receives only those: the C side converts
no loosely typed input of its own.

Every helper raises TypeError for a value of the wrong type and ValueError
for a value of the right type that is out of range or malformed.  Messages
name the option and show the offending value with repr(), so that a user
who passes a bad option through three layers of configuration still sees
which one it was.

Sizes follow Cache::FastMmap (see compute_geometry), with two deliberate
differences: page_size is always rounded down to a power of two (Perl does
so on only one of its three paths), and out-of-range geometry is an error
instead of something the engine finds out later.
"""

from __future__ import annotations

import math

# datetime and re are imported where first needed, not with the module, so
# that `import fastmmap` stays cheap: a timedelta can only be checked for
# once something that is not an int, float or str comes in, and the regexes
# are compiled on the first size or time string.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import datetime
    import re
    from typing import TypeGuard

__all__ = [
    "compute_perl_geometry",
    "parse_perl_start_slots",
    "DEFAULT_PAGE_SIZE",
    "DEFAULT_NUM_PAGES",
    "DEFAULT_START_SLOTS",
    "EXPIRE_NOW",
    "MIN_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "MAX_NUM_PAGES",
    "MAX_START_SLOTS",
    "MAX_EXPIRE_TIME",
    "MAX_LOCK_TIMEOUT",
    "parse_size",
    "parse_expire_time",
    "parse_expire_time_ms",
    "compute_geometry",
    "legacy_geometry",
    "LARGE_CACHE_SIZE",
    "LARGE_PAGE_SIZE",
    "parse_start_slots",
    "parse_permissions",
    "parse_lock_timeout",
]

DEFAULT_PAGE_SIZE = 65536
DEFAULT_NUM_PAGES = 89
DEFAULT_START_SLOTS = 89

#: A cache_size given without page_size or num_pages from this size up gets
#: LARGE_PAGE_SIZE pages, so that it stores the items a web application
#: caches (pages, API responses: memcached's default limit is 1 MiB) while
#: the Perl page-count walk still gives at least 43 pages to spread the
#: locks over.  Smaller caches keep 64 KiB pages: there, 2 MiB pages would
#: leave too few pages (a 16 MiB cache would have 9).
LARGE_CACHE_SIZE = 64 << 20
LARGE_PAGE_SIZE = 2 << 20

#: Returned by parse_expire_time for "now": the entry expires at once.
EXPIRE_NOW = -1

MIN_PAGE_SIZE = 1024
MAX_PAGE_SIZE = 1 << 30
MAX_NUM_PAGES = 1 << 24

MAX_START_SLOTS = 1 << 20

#: Longest relative expiry accepted, in seconds (50 years of 365 days).
#: Expiry is stored as absolute u32 unix seconds, which end in February 2106;
#: now + MAX_EXPIRE_TIME stays below 2**32 until about 2056.  (A 100-year
#: bound would already overflow today.)  The engine must still clamp
#: now + expire_time to 2**32 - 1.
MAX_EXPIRE_TIME = 50 * 365 * 86400

#: Longest lock_timeout accepted, in seconds (about 68 years): keeps the
#: nanosecond count the engine receives far inside int64.
MAX_LOCK_TIMEOUT = float(2**31 - 1)

# Cache::FastMmap's lower bound on page_size when it derives or adjusts the
# page size from cache_size (FastMmap.pm 1.43, lines 573 and 578).
_PERL_CACHE_SIZE_MIN_PAGE = 4096

_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}

# "4096", "64k", "64 KB", "64KiB", "1m", "2g", "4096b"; a bare "ib" needs a
# unit in front of it.  ASCII digits only (re.ASCII), so "６４k" is refused.
_SIZE_PATTERN = r"\s*([0-9]+)\s*(?:([kmg])(?:i?b)?|b)?\s*"

_TIME_UNITS = {
    "": 1,
    "s": 1,
    "m": 60,
    "h": 3600,
    "d": 86400,
    "w": 7 * 86400,
}

# Whole string, unlike Perl's /^(\d+)\s*([mhdws]?)/i, which reads
# "1 month" as 60 seconds.
_TIME_PATTERN = r"\s*([0-9]+)\s*([smhdw]?)\s*"

_compiled: dict[str, re.Pattern[str]] = {}


def _fullmatch(pattern: str, value: str) -> re.Match[str] | None:
    """re.fullmatch with pattern compiled on first use (case-insensitive, ASCII)."""
    rx = _compiled.get(pattern)
    if rx is None:
        import re

        rx = _compiled[pattern] = re.compile(pattern, re.IGNORECASE | re.ASCII)
    return rx.fullmatch(value)


def _is_timedelta(value: object) -> TypeGuard[datetime.timedelta]:
    if isinstance(value, (int, float, str)):
        return False
    import datetime

    return isinstance(value, datetime.timedelta)


def _as_int(value: object) -> int | None:
    """value as a plain int if it is an int or int subclass other than bool, else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    return None


def _digits(digits: str, name: str, value: object) -> int:
    """int() of a run of ASCII digits, with the option named if it is absurdly long."""
    if len(digits) > 40:  # also stays clear of int()'s 4300-digit limit
        raise ValueError(f"{name} is too large, got {value!r}")
    return int(digits)


def _fmt_bytes(n: int) -> str:
    """1048576 -> '1048576 (1 MiB)'; sizes that are not whole units stay bare."""
    for unit, mult in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n} ({n // mult} {unit})"
    return str(n)


def _round_pow2_down(n: int) -> int:
    """Largest power of two <= n; 0 for n < 1 (Perl's RoundPow2, exactly)."""
    if n < 1:
        return 0
    return 1 << (n.bit_length() - 1)


def _perl_num_pages(cache_size: int, page_size: int) -> int:
    """Perl's page count for a cache_size given without num_pages: from 89,
    n -> 2n + 1 while the pages fit in cache_size; otherwise n -> (n - 1) // 2
    until they fit, then one step back up (compute_geometry's docstring)."""
    np = DEFAULT_NUM_PAGES
    if np * page_size <= cache_size:
        while np * page_size <= cache_size:
            np = np * 2 + 1
    else:
        while np * page_size > cache_size:
            np = (np - 1) // 2
        np = np * 2 + 1
    return np


# ---------------------------------------------------------------- sizes


def parse_size(value: object, name: str) -> int:
    """Parse a byte size given as an int or a size string.

    Parameters
    ----------
    value
        An int >= 0 (bool is refused), or a string: decimal digits, an
        optional unit ``k``, ``m`` or ``g`` (powers of 1024,
        case-insensitive) and an optional ``b`` / ``ib`` after the unit:
        ``"4096"``, ``"64k"``, ``"64KB"``, ``"64 KiB"``, ``"1m"``, ``"2g"``.
        Surrounding whitespace and whitespace before the unit are allowed.
    name
        The option's name, used in error messages.

    Returns
    -------
    int
        The size in bytes.

    Raises
    ------
    TypeError
        If value is neither an int nor a str.
    ValueError
        If the string is malformed or the int is negative.
    """
    n = _as_int(value)
    if n is not None:
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
        return n
    if isinstance(value, str):
        m = _fullmatch(_SIZE_PATTERN, value)
        if m is None:
            raise ValueError(f"{name} must be a size like 4096, '64k', '1m' or '2g', got {value!r}")
        return _digits(m.group(1), name, value) * _SIZE_UNITS[(m.group(2) or "").lower()]
    raise TypeError(f"{name} must be an int or a size string like '64k', got {value!r}")


def _parse_count(value: object, name: str, low: int, high: int) -> int:
    """An int (not bool) within [low, high]."""
    n = _as_int(value)
    if n is None:
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not low <= n <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value!r}")
    return n


def _check_page_size(page_size: int, how: str) -> None:
    if not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(
            f"{how} gives page_size {page_size}; page_size must be between "
            f"{_fmt_bytes(MIN_PAGE_SIZE)} and {_fmt_bytes(MAX_PAGE_SIZE)} bytes "
            f"after rounding down to a power of two"
        )


def _check_num_pages(num_pages: int, how: str) -> None:
    if not 1 <= num_pages <= MAX_NUM_PAGES:
        raise ValueError(
            f"{how} gives num_pages {num_pages}; num_pages must be between 1 and {MAX_NUM_PAGES}"
        )


def compute_geometry(
    cache_size: object = None,
    page_size: object = None,
    num_pages: object = None,
) -> tuple[int, int] | None:
    """Work out (page_size, num_pages) from the three size options.

    The rules are Cache::FastMmap's (FastMmap.pm 1.43, ``sub new``):

    * none given: return None; the caller adopts an existing file's
      geometry, or uses DEFAULT_PAGE_SIZE x DEFAULT_NUM_PAGES.
    * cache_size and num_pages: page_size = cache_size / num_pages rounded
      down to a power of two, at least 4096.
    * cache_size alone, or with page_size: page_size (default 64 KiB, or
      LARGE_PAGE_SIZE for a cache_size of LARGE_CACHE_SIZE or more; at
      least 4096) is kept and num_pages starts at 89.  If 89 pages fit
      in cache_size, n -> 2n + 1 (179, 359, ...) until they no longer fit.
      Otherwise n -> (n - 1) // 2 (44, 21, 10, 4, 1, 0) until they fit,
      then one step back up by 2n + 1, so the result is one of 1, 3, 9, 21,
      43, 89, 179, 359, ...  Examples with 64 KiB pages: 1k -> 1 page,
      64k -> 3, 1m -> 21, 10m -> 179; with 2 MiB pages, 64m -> 43,
      100m -> 89, 1g -> 719.  The cache is usually
      larger than asked, but may be a little smaller (2.7 MiB -> 43 pages,
      2.69 MiB), as in Perl.
    * no cache_size: num_pages defaults to 89 and page_size to 64 KiB.

    Differences from Perl:

    * sizes are parsed with parse_size; num_pages is an int;
    * a cache_size of LARGE_CACHE_SIZE or more alone gets LARGE_PAGE_SIZE
      pages (Perl: 64 KiB at every size);
    * page_size is rounded down to a power of two on every path (Perl
      leaves it unrounded when cache_size is given without num_pages);
    * the result must have MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE and
      1 <= num_pages <= MAX_NUM_PAGES; 0 is an error (Perl treats a 0 as
      "not given");
    * all three given: page_size (rounded) * num_pages must equal
      cache_size, else ValueError (Perl ignores page_size then).

    Returns
    -------
    tuple of (int, int) or None
        (page_size, num_pages), or None when no size option was given.

    Raises
    ------
    TypeError, ValueError
        For a malformed option or a geometry out of range; the message
        says what was asked and what is allowed.
    """
    if cache_size is None and page_size is None and num_pages is None:
        return None

    cs = None if cache_size is None else parse_size(cache_size, "cache_size")
    ps_asked = None if page_size is None else parse_size(page_size, "page_size")
    np_asked = None if num_pages is None else _parse_count(num_pages, "num_pages", 1, MAX_NUM_PAGES)
    if ps_asked == 0:
        raise ValueError(
            f"page_size must be > 0, got {page_size!r}; leave it out (None) for the default"
        )

    if cs is None:
        # Perl: num_pages ||= 89; page_size ||= 65536; RoundPow2(page_size).
        np = DEFAULT_NUM_PAGES if np_asked is None else np_asked
        if ps_asked is None:
            ps = DEFAULT_PAGE_SIZE
        else:
            ps = _round_pow2_down(ps_asked)
            _check_page_size(ps, f"page_size={page_size!r}")
        return ps, np

    if cs == 0:
        raise ValueError(
            f"cache_size must be > 0, got {cache_size!r}; leave it out (None) for the default size"
        )

    if np_asked is not None and ps_asked is not None:
        ps = _round_pow2_down(ps_asked)
        _check_page_size(ps, f"page_size={page_size!r}")
        if ps * np_asked != cs:
            raise ValueError(
                f"cache_size={cache_size!r} ({cs} bytes) does not equal "
                f"page_size * num_pages = {ps} * {np_asked} = {ps * np_asked}; "
                "give at most two of cache_size, page_size and num_pages, "
                "or make the three agree"
            )
        return ps, np_asked

    if np_asked is not None:
        # Perl: page_size = RoundPow2(cache_size / num_pages), min 4096.
        # RoundPow2 of the exact quotient equals RoundPow2 of its floor,
        # since powers of two are integers; int arithmetic avoids Perl's
        # float log() (which can misround exact powers of two).
        ps = max(_round_pow2_down(cs // np_asked), _PERL_CACHE_SIZE_MIN_PAGE)
        _check_page_size(ps, f"cache_size={cache_size!r} with num_pages={np_asked}")
        return ps, np_asked

    # cache_size, optionally page_size, no num_pages.
    if ps_asked is None:
        ps = LARGE_PAGE_SIZE if cs >= LARGE_CACHE_SIZE else DEFAULT_PAGE_SIZE
        how = f"cache_size={cache_size!r}"
    else:
        ps = max(_round_pow2_down(ps_asked), _PERL_CACHE_SIZE_MIN_PAGE)
        how = f"cache_size={cache_size!r} with page_size={page_size!r}"
        _check_page_size(ps, how)
    np = _perl_num_pages(cs, ps)
    _check_num_pages(np, how + f" ({ps}-byte pages)")
    return ps, np


def legacy_geometry(cache_size: object, page_size: object, num_pages: object) -> tuple[int, int] | None:
    """The geometry compute_geometry gave before large caches got
    LARGE_PAGE_SIZE pages: (64 KiB, Perl's page count) when cache_size
    alone is at least LARGE_CACHE_SIZE, else None.  A file made with it by
    an earlier version is adopted rather than refused with GeometryError.
    """
    if cache_size is None or page_size is not None or num_pages is not None:
        return None
    cs = parse_size(cache_size, "cache_size")
    if cs < LARGE_CACHE_SIZE:
        return None
    return DEFAULT_PAGE_SIZE, _perl_num_pages(cs, DEFAULT_PAGE_SIZE)


# ---------------------------------------------------------------- expiry


def parse_expire_time(value: object, name: str = "expire_time") -> int:
    """Parse a relative expiry time into whole seconds.

    Parameters
    ----------
    value
        * an int or float >= 0, in seconds (a float is rounded up, so
          0.2 -> 1);
        * a datetime.timedelta >= 0 (rounded up to whole seconds);
        * a string, case-insensitive, the whole string: ``"30"``,
          ``"30s"``, ``"5m"`` (minutes), ``"2h"``, ``"1d"``, ``"1w"``,
          ``"never"`` or ``"now"``.  Unlike Perl, ``"1 month"`` is an
          error, not 60 seconds.

        None is not accepted: each caller decides what None means.
    name
        The option's name, used in error messages.

    Returns
    -------
    int
        Seconds; 0 means never expire ("never"), EXPIRE_NOW (-1) means
        expire at once ("now").

    Raises
    ------
    TypeError
        For None, bool or any other type.
    ValueError
        For negative, NaN, malformed, or more than MAX_EXPIRE_TIME seconds
        (expiry is stored as u32 absolute unix seconds).
    """
    as_int = _as_int(value)
    if as_int is not None:
        secs = as_int
    elif isinstance(value, float):
        if math.isnan(value):
            raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
        if math.isinf(value):
            raise ValueError(
                f"{name} must be at most {MAX_EXPIRE_TIME} seconds (50 years), "
                f"got {value!r}; use 0 or 'never' for no expiry"
            )
        secs = math.ceil(value)
    elif _is_timedelta(value):
        if value.days < 0:  # a timedelta is normalised: negative iff days < 0
            raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
        secs = value.days * 86400 + value.seconds + (1 if value.microseconds else 0)
    elif isinstance(value, str):
        word = value.strip().lower()
        if word == "never":
            return 0
        if word == "now":
            return EXPIRE_NOW
        m = _fullmatch(_TIME_PATTERN, value)
        if m is None:
            raise ValueError(
                f"{name} must be seconds or a string like '30s', '5m', '2h', "
                f"'1d', '1w', 'never' or 'now', got {value!r}"
            )
        secs = _digits(m.group(1), name, value) * _TIME_UNITS[m.group(2).lower()]
    else:
        raise TypeError(
            f"{name} must be an int, float, timedelta or a string like '5m', got {value!r}"
        )
    if secs < 0:
        raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
    if secs > MAX_EXPIRE_TIME:
        raise ValueError(
            f"{name} must be at most {MAX_EXPIRE_TIME} seconds (50 years), "
            f"got {value!r}; use 0 or 'never' for no expiry"
        )
    return secs


def parse_expire_time_ms(value: object, name: str = "expire_time") -> int:
    """parse_expire_time in milliseconds: the native format's resolution.

    Accepts and rejects what parse_expire_time does; a float or a timedelta
    is rounded up to the millisecond (0.25 -> 250), not to the second.
    Returns 0 for never and EXPIRE_NOW for now, as parse_expire_time.
    """
    secs = parse_expire_time(value, name)  # validates, and the whole-second cases
    if secs in (0, EXPIRE_NOW) and not (isinstance(value, float) or _is_timedelta(value)):
        return secs
    if isinstance(value, float):
        return math.ceil(value * 1000) if value else 0
    if _is_timedelta(value):
        micros = (value.days * 86400 + value.seconds) * 1_000_000 + value.microseconds
        return -(-micros // 1000)
    return secs * 1000


def compute_perl_geometry(
    cache_size: object = None,
    page_size: object = None,
    num_pages: object = None,
) -> tuple[int, int]:
    """(page_size, num_pages) exactly as Cache::FastMmap computes them.

    For format="perl": a Python process given the same options as a Perl
    process maps the same geometry.  The Perl file has no header, so there
    is nothing to adopt: the options (or Perl's defaults, 89 pages of
    64 KiB) always decide.  Perl's ``new``:

    * cache_size and num_pages: page_size = RoundPow2(cache_size /
      num_pages), at least 4096;
    * cache_size alone (or with page_size): page_size (default 64 KiB) is
      kept as given, not rounded, at least 4096; num_pages walks
      1, 3, 9, 21, 43, 89, 179, ... (n -> 2n + 1) to the first count whose
      pages hold more than cache_size, as compute_geometry documents;
    * no cache_size: num_pages (default 89) and RoundPow2(page_size)
      (default 64 KiB).

    A 0 counts as not given, as in Perl.  The result must have
    MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE with page_size a multiple
    of 4, and 1 <= num_pages <= MAX_NUM_PAGES (Perl checks neither).
    """
    cs = 0 if cache_size is None else parse_size(cache_size, "cache_size")
    ps = 0 if page_size is None else parse_size(page_size, "page_size")
    np = 0 if num_pages is None else _parse_count(num_pages, "num_pages", 0, MAX_NUM_PAGES)
    if cs:
        if np:
            ps = max(_round_pow2_down(cs // np), 4096)
            how = f"cache_size={cache_size!r} with num_pages={num_pages!r}"
        else:
            ps = max(ps or DEFAULT_PAGE_SIZE, 4096)
            np = _perl_num_pages(cs, ps)
            how = f"cache_size={cache_size!r}"
    else:
        np = np or DEFAULT_NUM_PAGES
        ps = _round_pow2_down(ps or DEFAULT_PAGE_SIZE)
        how = f"page_size={page_size!r}" if page_size is not None else "the defaults"
    if not MIN_PAGE_SIZE <= ps <= MAX_PAGE_SIZE or ps % 4:
        raise ValueError(
            f"{how} gives page_size {ps}; format='perl' needs a page_size between "
            f"{_fmt_bytes(MIN_PAGE_SIZE)} and {_fmt_bytes(MAX_PAGE_SIZE)} bytes, a multiple of 4"
        )
    _check_num_pages(np, how)
    return ps, np


def parse_perl_start_slots(value: object) -> int:
    """start_slots for format="perl": Perl's ``int(start_slots || 0) || 89``."""
    if value is None:
        return DEFAULT_START_SLOTS
    n = _parse_count(value, "start_slots", 0, MAX_START_SLOTS)
    return n or DEFAULT_START_SLOTS


# ---------------------------------------------------------------- the rest


def parse_start_slots(value: object) -> int | None:
    """Validate start_slots, the initial slot-table size of each page.

    Returns None unchanged (adopt the file's, or the default), else an int
    within [1, MAX_START_SLOTS].  The engine may round it up (to a power of
    two) or cap it to what fits in a page.

    Raises TypeError for a non-int (bool included), ValueError when out of
    range.
    """
    if value is None:
        return None
    return _parse_count(value, "start_slots", 1, MAX_START_SLOTS)


def parse_permissions(value: object) -> int:
    """Validate permissions, the mode of a file the cache creates.

    An int within [1, 0o7777], usually written in octal (0o600).  Raises
    TypeError for a non-int (bool and strings like "0600" included),
    ValueError when out of range.  0 is refused rather than applied: a
    file of mode 0 is one that no process but root's can open again.
    """
    mode = _as_int(value)
    if mode is None:
        raise TypeError(f"permissions must be an int such as 0o600, got {value!r}")
    if mode == 0:
        raise ValueError(
            "permissions=0 would create a file that no process but root's can open; "
            "pass a mode such as 0o600"
        )
    if not 0 <= mode <= 0o7777:
        raise ValueError(
            f"permissions must be between 1 and 0o7777, got {value!r}"
            + (f" ({oct(mode)})" if mode >= 0 else "")
        )
    return mode


def parse_lock_timeout(value: object) -> float | None:
    """Validate lock_timeout, the longest wait for a page lock.

    None means wait forever.  Otherwise an int or float number of seconds,
    > 0, finite and at most MAX_LOCK_TIMEOUT; returned as a float.  Raises
    TypeError for other types (bool included), ValueError for 0, negative,
    NaN, infinite or too large values (use None to wait forever).
    """
    if value is None:
        return None
    as_int = _as_int(value)
    if as_int is not None:
        # Compare as int first: float() of a huge int raises OverflowError.
        secs = float(min(as_int, int(MAX_LOCK_TIMEOUT) + 1))
    elif isinstance(value, float):
        secs = value
    else:
        raise TypeError(f"lock_timeout must be a number of seconds or None, got {value!r}")
    if math.isnan(secs) or secs <= 0:
        raise ValueError(
            f"lock_timeout must be a number of seconds > 0, or None to wait forever, got {value!r}"
        )
    if secs > MAX_LOCK_TIMEOUT:
        raise ValueError(
            f"lock_timeout must be at most {int(MAX_LOCK_TIMEOUT)} seconds, "
            f"or None to wait forever, got {value!r}"
        )
    return secs
