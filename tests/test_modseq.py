"""Versioned writes: modseq and tombstones (Cache::FastMmap 1.63, t/25.t).

The rules (fmm.h, README "Versioned writes"), checked against an existing,
unexpired entry that carries a modseq:

    existing tombstone, set without modseq        -> refused (False)
    existing tombstone, set with modseq <  old    -> refused
    existing tombstone, set with modseq >= old    -> stored
    existing tombstone, remove with modseq <= old -> no change
    existing value,     remove with modseq <= old -> no change (value kept)
    existing value,     set with modseq <  old    -> refused (value kept)
    existing value,     set without modseq        -> stored, modseq dropped
    anything else                                 -> stored

Every cache here is made by the ``make`` fixture, from ``format_options``,
which is parametrized: the whole file runs against the native format and
against the Perl format (``format="perl"``, serializer json).
"""

from __future__ import annotations

import json
import os
import time

import pytest

import fastmmap
from fastmmap import _fastmmap as _C

T0 = 1_700_000_000
TOMB = object()  # "the key holds a tombstone" in the rules table below


@pytest.fixture(params=["native", "perl"])
def format_options(request):
    """Options that select the file format: every test runs against both.
    The Perl format refuses pickle (Perl cannot read it): json there."""
    if request.param == "perl":
        return {"format": "perl", "serializer": "raw"}
    return {}


@pytest.fixture
def make(cache, format_options):
    """make(**options) -> a Cache with its clock at T0 (the one place caches are made)."""

    def mk(**options):
        c = cache(**{"num_pages": 3, "page_size": "16k", **format_options, **options})
        c._set_time_override(T0)
        return c

    return mk


@pytest.fixture
def make_any(make, format_options):
    """make() for tests that store values other than bytes, str and None (ints,
    dicts): the Perl format's raw serializer holds only those, so json there."""

    def mk(**options):
        if format_options.get("format") == "perl":
            options = {"serializer": "json", **options}
        return make(**options)

    return mk


def absent_everywhere(c, key):
    """Every read path agrees that key is not there."""
    assert c.get(key, "<miss>") == "<miss>"
    assert key not in c
    assert not c.exists(key)
    assert key not in c.keys()
    assert key not in list(c)
    assert key not in [d["key"] for d in c.get_keys(2)]
    assert key not in dict(c.items())
    with pytest.raises(KeyError):
        c[key]


def state(c, key):
    """(value or TOMB or None, modseq) of key."""
    value = c.get(key, TOMB if c.get_modseq(key) is not None else None)
    return value, c.get_modseq(key)


# ---------------------------------------------------------------- the rules

# (what the key holds first, the operation, its result, what it holds after)
RULES = [
    # existing tombstone (modseq 5)
    ("tomb", ("set", None), False, (TOMB, 5)),
    ("tomb", ("set", 4), False, (TOMB, 5)),
    ("tomb", ("set", 0), False, (TOMB, 5)),
    ("tomb", ("set", 5), True, ("new", 5)),
    ("tomb", ("set", 6), True, ("new", 6)),
    ("tomb", ("remove", 5), False, (TOMB, 5)),
    ("tomb", ("remove", 4), False, (TOMB, 5)),
    ("tomb", ("remove", 6), False, (TOMB, 6)),
    # existing value with modseq 5
    ("ms", ("remove", 5), False, ("old", 5)),
    ("ms", ("remove", 4), False, ("old", 5)),
    ("ms", ("remove", 6), True, (TOMB, 6)),
    ("ms", ("set", 4), False, ("old", 5)),
    ("ms", ("set", 5), True, ("new", 5)),
    ("ms", ("set", 6), True, ("new", 6)),
    ("ms", ("set", None), True, ("new", None)),
    # anything else: stored
    ("plain", ("set", 1), True, ("new", 1)),
    ("plain", ("remove", 1), True, (TOMB, 1)),
    ("plain", ("set", None), True, ("new", None)),
    ("absent", ("set", 0), True, ("new", 0)),
    ("absent", ("remove", 3), False, (TOMB, 3)),
]


@pytest.mark.parametrize(
    "first, op, result, after", RULES, ids=[f"{f}-{o[0]}-{o[1]}" for f, o, _, _ in RULES]
)
def test_rules(make, first, op, result, after):
    c = make()
    if first == "tomb":
        c.set("k", "old", modseq=1)
        assert c.remove("k", modseq=5) is True
    elif first == "ms":
        assert c.set("k", "old", modseq=5) is True
    elif first == "plain":
        c.set("k", "old")
    c.set("other", "x", modseq=100)  # another key never interferes
    name, ms = op
    if name == "set":
        got = c.set("k", "new", modseq=ms) if ms is not None else c.set("k", "new")
    else:
        got = c.remove("k", modseq=ms)
    assert got is result
    assert state(c, "k") == after
    if after[0] is TOMB:
        absent_everywhere(c, "k")
    assert state(c, "other") == ("x", 100)
    assert c.check() == []


def test_modseq_range_is_unsigned_64_bit(make):
    c = make()
    top = 2**64 - 1
    assert c.set("k", b"v", modseq=top)
    assert c.get_modseq("k") == top
    assert not c.set("k", b"w", modseq=top - 1)
    assert not c.set("k", b"w", modseq=2**63)
    assert c.remove("k", modseq=top) is False
    assert c["k"] == b"v"
    assert c.set("z", b"v", modseq=0) and c.get_modseq("z") == 0


def test_plain_set_drops_the_modseq_and_compares_no_more(make):
    c = make()
    c.set("k", "a", modseq=50)
    assert c.set("k", "b")
    assert c.get_modseq("k") is None
    assert c.set("k", "c", modseq=1)  # nothing to compare with
    assert state(c, "k") == ("c", 1)


# ---------------------------------------------------------------- tombstone expiry


def test_tombstone_expires_with_the_default_expire_time(make):
    c = make(expire_time=10)
    c.set("k", "v", modseq=5)
    assert c.remove("k", modseq=6) is True
    c._set_time_override(T0 + 9)
    assert not c.set("k", "late")
    assert not c.set("k", "late", modseq=5)
    c._set_time_override(T0 + 10)
    assert c.get_modseq("k") is None  # expired: gone for every purpose
    assert c.set("k", "later")
    assert c["k"] == "later"


def test_tombstone_expire_time_option(make):
    c = make(expire_time="1h", tombstone_expire_time=5)
    c.remove("k", modseq=1)
    c._set_time_override(T0 + 4)
    assert not c.set("k", "v")
    c._set_time_override(T0 + 5)
    assert c.set("k", "v")
    # values keep the cache's expire_time
    assert [d["expire_on"] for d in c.get_keys(1) if d["key"] == "k"] == [T0 + 5 + 3600]


def test_tombstones_never_expire_without_an_expire_time(make):
    c = make()
    c.remove("k", modseq=1)
    c._set_time_override(T0 + 10 * 365 * 86400)
    assert not c.set("k", "v")
    assert c.get_modseq("k") == 1


def test_tombstone_expire_time_never(make):
    c = make(expire_time=10, tombstone_expire_time="never")
    c.remove("k", modseq=1)
    c._set_time_override(T0 + 1000)
    assert c.get_modseq("k") == 1


def test_remove_expire_time_and_expire_on_override(make):
    c = make(expire_time=100, tombstone_expire_time=100)
    c.remove("a", modseq=1, expire_time=3)
    c.remove("b", modseq=1, expire_on=T0 + 7)
    c.remove("c", modseq=1, expire_time="never")
    c.remove("d", modseq=1, expire_time=3, expire_on=T0 + 50)  # expire_on wins
    c._set_time_override(T0 + 3)
    assert c.get_modseq("a") is None and c.set("a", "v")
    assert c.get_modseq("b") == 1 and not c.set("b", "v")
    c._set_time_override(T0 + 7)
    assert c.set("b", "v")
    c._set_time_override(T0 + 49)
    assert not c.set("d", "v")
    c._set_time_override(T0 + 10**6)
    assert c.get_modseq("c") == 1


def test_expired_modseq_value_never_blocks(make):
    c = make()
    c.set("k", "v", modseq=9, expire_time=2)
    assert not c.set("k", "w", modseq=8)
    c._set_time_override(T0 + 2)
    assert c.set("k", "w", modseq=8)
    assert state(c, "k") == ("w", 8)


# ---------------------------------------------------------------- visibility


def test_tombstones_are_hidden_from_every_read_path(make_any):
    c = make_any()
    c.set("live", "v", modseq=1)
    c["plain"] = 1
    for i in range(20):
        c.remove(f"t{i}", modseq=i)
    assert len(c) == 2
    assert sorted(c.keys()) == ["live", "plain"]
    assert sorted(c) == ["live", "plain"]
    assert sorted(k for k, _ in c.items()) == ["live", "plain"]
    assert sorted(map(repr, c.values())) == ["'v'", "1"]
    assert sorted(d["key"] for d in c.get_keys(1)) == ["live", "plain"]
    for i in range(20):
        absent_everywhere(c, f"t{i}")
        assert c.get_and_remove(f"t{i}", "dflt") == "dflt"
        assert c.pop(f"t{i}", "dflt") == "dflt"
        assert c.multi_get("p", [f"t{i}"]) == {}
        assert c.get_modseq(f"t{i}") == i  # still there
    assert c._page_info(0)["tombstones"] + c._page_info(1)["tombstones"] + c._page_info(2)["tombstones"] == 20


def test_get_keys_reports_modseq(make):
    c = make()
    c.set("m", b"v", modseq=42)
    c.set("p", b"v")
    c.remove("t", modseq=7)
    for mode in (1, 2):
        by_key = {d["key"]: d for d in c.get_keys(mode)}
        assert set(by_key) == {"m", "p"}
        assert by_key["m"]["modseq"] == 42
        assert by_key["m"]["flags"] & _C.F_MODSEQ
        assert "modseq" not in by_key["p"]
        assert not by_key["p"]["flags"] & _C.F_MODSEQ
        if mode == 2:
            assert by_key["m"]["value"] == b"v"


def test_get_modseq_does_not_touch_lru_order_or_statistics(make):
    c = make(enable_stats=True)
    c.set("k", "v", modseq=3)
    [before] = [d["last_access"] for d in c.get_keys(1)]
    c._set_time_override(T0 + 50)
    assert c.get_modseq("k") == 3
    assert c.get_modseq("missing") is None
    assert [d["last_access"] for d in c.get_keys(1)] == [before]
    assert c.get_statistics() == (0, 0)


def test_get_modseq_of_a_plain_value_is_none(make):
    c = make()
    c["k"] = "v"
    assert c.get_modseq("k") is None
    assert c.get_modseq(b"nope") is None


# ---------------------------------------------------------------- values of every kind


@pytest.mark.parametrize(
    "value",
    [b"bytes", b"", "text \u263a", "", None, 12345, {"a": [1, 2]}, [None, 1.5], b"x" * 3000],
    ids=["bytes", "empty-bytes", "str", "empty-str", "None", "int", "dict", "list", "big"],
)
def test_values_round_trip_with_modseq(make, make_any, value):
    # Perl format: bytes, str and None with the raw serializer; ints, dicts
    # and lists with json (which cannot hold bytes)
    c = make() if value is None or isinstance(value, (bytes, str)) else make_any()
    assert c.set("k", value, modseq=17)
    assert c.get("k", "<miss>") == value
    assert c.get_modseq("k") == 17
    [d] = c.get_keys(2)
    assert d["value"] == value and d["modseq"] == 17
    assert not c.set("k", "older", modseq=16)
    assert c.get("k", "<miss>") == value


def test_modseq_with_json_and_compression(make):
    c = make(serializer="json", compressor="zlib", compress_threshold=10)
    big = {"k": "v" * 500}
    assert c.set("j", big, modseq=2)
    assert c["j"] == big and c.get_modseq("j") == 2
    assert json.loads(json.dumps(c.get_keys(2)[0]["value"])) == big


def test_modseq_with_the_8_byte_prefix_at_the_page_limit(make):
    c = make(page_size="4k", num_pages=1)
    room = c.max_item_size - len("k")
    assert c.set("k", b"x" * room)  # fits without a modseq
    assert not c.set("k", b"y" * room, modseq=1)  # the 8-byte modseq does not fit
    assert c["k"] == b"x" * room
    assert c.set("k", b"y" * (room - 8), modseq=1)
    assert state(c, "k") == (b"y" * (room - 8), 1)


def test_str_and_bytes_keys_share_modseq(make):
    c = make()
    c.set("k\u00e9", "v", modseq=4)
    assert c.get_modseq("k\u00e9".encode()) == 4
    assert not c.set("k\u00e9".encode(), "w", modseq=3)


# ---------------------------------------------------------------- read-through, callbacks


def test_read_cb_does_not_cache_over_a_tombstone(make):
    calls = []

    def read_cb(ctx, key):
        calls.append(key)
        return "from store"

    c = make(read_cb=read_cb)
    c.remove("k", modseq=9)
    assert c.get("k") == "from store"
    assert c["k"] == "from store"
    assert calls == ["k", "k"]  # not cached: asked again
    assert c.get_modseq("k") == 9
    assert "k" not in c
    # a key without a tombstone is cached as usual
    assert c.get("other") == "from store"
    assert c.get("other") == "from store"
    assert calls == ["k", "k", "other"]


def test_read_cb_none_with_cache_not_found_over_a_tombstone(make):
    c = make(read_cb=lambda ctx, key: None, cache_not_found=True)
    c.remove("k", modseq=1)
    assert c.get("k", "dflt") is None  # the read_cb result, not stored
    assert c.get_modseq("k") == 1 and "k" not in c


def test_write_through_callbacks(make):
    writes, deletes = [], []
    c = make(
        write_cb=lambda ctx, k, v, exp: writes.append((k, v)),
        delete_cb=lambda ctx, k: deletes.append(k),
    )
    assert c.set("k", "v1", modseq=5)
    assert not c.set("k", "v0", modseq=4)  # refused: the store is not told
    assert writes == [("k", "v1")]
    assert c.remove("k", modseq=4) is False  # no change: not deleted in the store either
    assert deletes == []
    assert c.remove("k", modseq=6) is True
    assert deletes == ["k"]
    assert not c.set("k", "v2")
    assert writes == [("k", "v1")]


def test_write_back_never_writes_tombstones(make):
    written = []
    c = make(write_action="write_back", write_cb=lambda ctx, k, v, exp: written.append((k, v)))
    c.set("a", "va", modseq=1)
    c.set("b", "vb", modseq=1)
    c.remove("b", modseq=2)
    c.remove("c", modseq=2)
    assert written == []
    c.empty()
    assert written == [("a", "va")]  # the value, never its modseq or a tombstone


def test_get_and_set_conditional_store(make_any):
    c = make_any()
    seen = []

    def fn(key, old):
        seen.append(old)
        return (old or 0) + 1

    assert c.get_and_set("n", fn, modseq=5) == 1
    assert state(c, "n") == (1, 5)
    # an older modseq: refused; the current value is returned, nothing changes
    assert c.get_and_set("n", fn, modseq=4) == 1
    assert state(c, "n") == (1, 5)
    assert c.get_and_set("n", fn, modseq=5) == 2
    assert c.get_and_set("n", fn) == 3  # a plain store drops the modseq
    assert c.get_modseq("n") is None
    # over a tombstone: fn sees None; a plain or older store is refused
    c.remove("n", modseq=10)
    assert c.get_and_set("n", fn) is None
    assert c.get_and_set("n", fn, modseq=9) is None
    assert state(c, "n") == (TOMB, 10)
    assert c.get_and_set("n", fn, modseq=10) == 1
    assert state(c, "n") == (1, 10)
    assert seen == [None, 1, 1, 2, None, None, None]


def test_other_writers_over_a_tombstone(make):
    c = make()
    c.remove("k", modseq=3)
    assert c.add("k", "v") is False
    assert c.touch("k", expire_time=10) is False
    c["k"] = "ignored"  # refused like set(): no error, the key stays absent
    assert state(c, "k") == (TOMB, 3)
    with c.lock("k") as e:
        assert e.value is None and not e.exists
        e.value = "ignored"
        assert not e.exists
    assert state(c, "k") == (TOMB, 3)
    c.expire("k")  # expire() leaves tombstones alone
    assert state(c, "k") == (TOMB, 3)


# A tombstoned key reads as absent and refuses a plain store: a method that
# looped "get, else add" until one of them succeeded never returned.  The
# timeout turns such a regression into a failure instead of a hung suite.
@pytest.mark.timeout(20)
@pytest.mark.parametrize("method", ["setdefault", "pop", "popitem", "update"])
def test_mapping_methods_terminate_over_a_tombstone(make, method):
    c = make()
    c.remove("k", modseq=3)
    if method == "setdefault":
        # the store is refused as for cache["k"] = "d": default back, key absent
        assert c.setdefault("k", "d") == "d"
        assert c.setdefault("k") is None
    elif method == "pop":
        assert c.pop("k", "d") == "d"
        with pytest.raises(KeyError):
            c.pop("k")
    elif method == "popitem":
        with pytest.raises(KeyError):
            c.popitem()  # the tombstone is not an item
        c["live"] = "v"
        assert c.popitem() == ("live", "v")
    else:
        c.update({"k": "x", "other": "y"})
        c.update([("k", "x")], k="z")
        assert c.get("other") == "y"
    assert state(c, "k") == (TOMB, 3)
    assert "k" not in c


def test_setdefault_over_a_tombstone_asks_read_cb(make):
    calls = []

    def read_cb(ctx, key):
        calls.append(key)
        return "from store"

    c = make(read_cb=read_cb)
    c.remove("k", modseq=3)
    assert c.setdefault("k", "d") == "from store"  # as get() answers it, not stored
    assert calls == ["k"]
    assert c.get_modseq("k") == 3 and not c.exists("k")
    assert c.setdefault("other", "d") == "from store"  # cached as by get()
    assert c.setdefault("other", "d") == "from store"
    assert calls == ["k", "other"]


def test_touch_keeps_the_modseq(make):
    c = make()
    c.set("k", "v", modseq=8)
    assert c.touch("k", expire_time=60)
    assert state(c, "k") == ("v", 8)
    assert [d["expire_on"] for d in c.get_keys(1)] == [T0 + 60]


@pytest.mark.parametrize("how", ["del", "remove", "get_and_remove"])
def test_deleting_without_modseq_drops_the_tombstone(make, how):
    c = make()
    c.remove("k", modseq=3)
    if how == "del":
        with pytest.raises(KeyError):
            del c["k"]
    elif how == "remove":
        assert c.remove("k") is False
    else:
        assert c.get_and_remove("k", "d") == "d"
    if how == "get_and_remove":  # reads, so the tombstone stays
        assert c.get_modseq("k") == 3
        return
    assert c.get_modseq("k") is None
    assert c.set("k", "v")


def test_remove_with_modseq_of_a_live_plain_value(make):
    c = make()
    c["k"] = "v"
    assert c.remove("k", modseq=0) is True
    assert state(c, "k") == (TOMB, 0)


def test_modseq_survives_reopen_and_compaction(make, cache, format_options):
    c = make(num_pages=1, page_size="8k")
    c.set("keep", "v", modseq=77)
    c.remove("gone", modseq=78)
    for i in range(200):  # churn another key to force compactions
        c.set("churn", os.urandom(50 + i % 40))
    assert state(c, "keep") == ("v", 77)
    assert state(c, "gone") == (TOMB, 78)
    # a Perl file has no header: its format and geometry come from the options
    c2 = cache(c.share_file, num_pages=1, page_size="8k", **format_options)
    assert c2.get_modseq("keep") == 77 and c2.get_modseq("gone") == 78
    assert not c2.set("gone", "x")


def test_tombstones_are_evicted_like_any_entry(make):
    c = make(num_pages=1, page_size="4k")
    c.remove("old", modseq=1)
    for i in range(200):
        c.set(f"k{i}", b"v" * 60)
    assert c.get_modseq("old") is None  # least recently used: gone
    assert c.set("old", "v")
    assert c.check() == []


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "call, exc",
    [
        (lambda c: c.set("k", "v", modseq="1"), TypeError),
        (lambda c: c.set("k", "v", modseq=1.0), TypeError),
        (lambda c: c.set("k", "v", modseq=True), TypeError),
        (lambda c: c.set("k", "v", modseq=-1), ValueError),
        (lambda c: c.set("k", "v", modseq=2**64), ValueError),
        (lambda c: c.remove("k", modseq=-1), ValueError),
        (lambda c: c.remove("k", modseq=b"1"), TypeError),
        (lambda c: c.remove("k", 5), TypeError),  # modseq is keyword-only
        (lambda c: c.remove("k", expire_time=5), TypeError),  # only with modseq
        (lambda c: c.remove("k", expire_on=T0 + 5), TypeError),
        (lambda c: c.remove("k", modseq=9, expire_time=-5), ValueError),
        (lambda c: c.get_and_set("k", lambda k, v: 1, modseq=-1), ValueError),
        (lambda c: c.get_and_set("k", lambda k, v: 1, modseq=[]), TypeError),
        (lambda c: c.get_modseq(1), TypeError),
        (lambda c: c.remove(1, modseq=1), TypeError),
    ],
)
def test_bad_modseq_arguments_change_nothing(make, call, exc):
    c = make()
    c.set("k", "v", modseq=5)
    c.remove("t", modseq=6)
    with pytest.raises(exc):
        call(c)
    assert state(c, "k") == ("v", 5)
    assert state(c, "t") == (TOMB, 6)


def test_bad_tombstone_expire_time_option(make):
    with pytest.raises(ValueError):
        make(tombstone_expire_time="garbage")
    with pytest.raises(TypeError):
        make(tombstone_expire_time=[1])


def test_modseq_error_messages(make):
    c = make()
    with pytest.raises(ValueError, match=r"modseq must be between 0 and 2\*\*64-1"):
        c.set("k", "v", modseq=-3)
    with pytest.raises(TypeError, match="modseq must be an int, not str"):
        c.set("k", "v", modseq="3")
    with pytest.raises(TypeError, match="only with modseq"):
        c.remove("k", expire_time=3)


# ---------------------------------------------------------------- two processes


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_two_processes_interleaved_modseqs_end_with_the_highest(make_any, forked, format_options):
    c = make_any(num_pages=2, page_size="8k", lock_timeout=30)
    # a Perl file has no header: its format and geometry come from the options
    reopen = {"num_pages": 2, "page_size": "8k", **format_options}
    if format_options.get("format") == "perl":
        reopen["serializer"] = "json"  # ints below
    keys = [f"doc{i}" for i in range(4)]
    n = 1500

    def writer(parity):
        # this process writes modseqs parity, parity+2, ...; the other the rest
        w = fastmmap.Cache(c.share_file, lock_timeout=30, **reopen)
        # start together: each announces itself, then waits for the other
        w.get_and_set("ready", lambda k, v: (v or 0) + 1)
        deadline = time.monotonic() + 20
        while w.get("ready") < 2 and time.monotonic() < deadline:
            time.sleep(0.0005)
        stored = refused = 0
        for ms in range(parity, n, 2):
            # stay within a few modseqs of the other writer, so that the two
            # really interleave however the machine schedules them: at most
            # one of the two is ever behind, so this wait cannot deadlock,
            # and its bound is only against a writer that died
            w.set(f"progress{parity}", ms)
            spin_until = time.monotonic() + 60
            while w.get(f"progress{1 - parity}", -1) < ms - 6 and time.monotonic() < spin_until:
                pass
            for key in keys:
                if w.set(key, f"{key}@{ms}", modseq=ms):
                    stored += 1
                else:
                    refused += 1
                got = w.get_modseq(key)
                assert got is not None and got >= ms, (key, ms, got)  # never goes back
        # the last word on doc0 is a deletion by the process with the top modseq
        if parity == (n - 1) % 2:
            assert w.remove("doc0", modseq=n + 1) in (True, False)
        w.close()
        return stored, refused

    a = forked.start(writer, 0)
    b = forked.start(writer, 1)
    (sa, ra), (sb, rb) = a.result(), b.result()
    print(f"stored, refused: {sa}, {ra} and {sb}, {rb}")  # shown with -s: how much they interleaved
    assert sa + ra == sb + rb == len(keys) * n // 2
    assert sa and sb and ra + rb, "the writers did not interleave"
    top = n - 1
    for key in keys[1:]:
        assert state(c, key) == (f"{key}@{top}", top)
    assert state(c, "doc0") == (TOMB, n + 1)
    # a late arrival of any older version is refused
    assert not c.set("doc1", "late", modseq=top - 1)
    assert not c.set("doc0", "late", modseq=top)
    assert c.check() == []
