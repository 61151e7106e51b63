"""Core get/set/remove behaviour, keys, values and their types."""

from __future__ import annotations

import datetime
import decimal
import fractions
import gc
import sys
import threading
import tracemalloc

import pytest

import fastmmap


class Point:
    """A user class: pickled by reference to this module."""

    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return type(other) is Point and (self.x, self.y) == (other.x, other.y)

    def __repr__(self) -> str:
        return f"Point({self.x}, {self.y})"


VALUES = [
    None,
    True,
    False,
    0,
    -1,
    7,
    2**64,
    -(2**200),
    1.5,
    float("inf"),
    complex(1, -2),
    "",
    "text",
    "caf\u00e9 \u263a \U0001f600",
    "nul\x00inside",
    b"",
    b"bytes",
    bytes(range(256)),
    bytearray(b"mutable"),
    [],
    [1, "two", 3.0],
    {},
    {"a": 1, "b": [1, 2, {"c": (3, 4)}]},
    (),
    (1, "a", None),
    ((1, 2), [3, (4, 5)]),
    {1, 2, 3},
    frozenset({"x", "y"}),
    {"nested": {"deeper": {"deepest": [None, True, b"raw"]}}},
    decimal.Decimal("3.14159"),
    fractions.Fraction(1, 3),
    datetime.datetime(2024, 2, 29, 12, 30, tzinfo=datetime.timezone.utc),
    Point(3, 4),
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: f"{type(v).__name__}:{v!r:.20}")
def test_value_roundtrip_keeps_type(cache, value):
    c = cache(num_pages=3)
    assert c.set("k", value) is True
    got = c.get("k")
    assert type(got) is type(value)
    assert got == value
    assert "k" in c
    assert c.exists("k") is True
    item = c["k"]
    assert type(item) is type(value) and item == value
    c["k2"] = value
    assert type(c["k2"]) is type(value) and c["k2"] == value


def test_get_returns_a_fresh_object(cache):
    c = cache(num_pages=3)
    c["k"] = {"a": [1]}
    first = c["k"]
    first["a"].append(2)
    assert c["k"] == {"a": [1]}


def test_str_and_bytes_values_keep_their_type(cache):
    c = cache(num_pages=3)
    c.set("s", "abc")
    c.set("b", b"abc")
    assert c.get("s") == "abc" and type(c.get("s")) is str
    assert c.get("b") == b"abc" and type(c.get("b")) is bytes
    assert c.get("s") != c.get("b")


def test_none_value_is_distinct_from_a_miss(cache):
    c = cache(num_pages=3)
    assert c.set("none", None) is True
    assert "none" in c
    assert c["none"] is None
    assert c.get("none", "default") is None
    assert c.get("missing", "default") == "default"
    with pytest.raises(KeyError):
        c["missing"]


def test_get_default(cache):
    c = cache(num_pages=3)
    assert c.get("nope") is None
    assert c.get("nope", 5) == 5
    sentinel = object()
    assert c.get("nope", sentinel) is sentinel


def test_overwrite(cache):
    c = cache(num_pages=3)
    c.set("k", "one")
    c.set("k", 2)
    assert c.get("k") == 2
    c.set("k", b"three")
    assert c.get("k") == b"three"
    assert len(c) == 1


# ---------------------------------------------------------------- keys


def test_str_and_bytes_keys_name_the_same_entry(cache):
    c = cache(num_pages=3)
    c["a"] = 1
    assert c[b"a"] == 1
    assert b"a" in c
    c[b"a"] = 2
    assert c["a"] == 2
    assert len(c) == 1
    del c[b"a"]
    assert "a" not in c


def test_non_ascii_str_key_is_its_utf8_bytes(cache):
    c = cache(num_pages=3)
    key = "\u043a\u043b\u044e\u0447 \u263a"
    c[key] = "v"
    assert c[key.encode("utf-8")] == "v"
    assert c.exists(key)
    assert list(c.keys()) == [key]


def test_keys_come_back_with_the_type_they_were_set_with(cache):
    c = cache(num_pages=3)
    c["text"] = 1
    c[b"raw"] = 2
    c[b"\xff\xfe"] = 3  # not UTF-8: must stay bytes
    c["\u263a"] = 4
    keys = list(c.keys())
    assert sorted(keys, key=repr) == sorted(["text", b"raw", b"\xff\xfe", "\u263a"], key=repr)
    assert {type(k) for k in keys if isinstance(k, bytes)} == {bytes}
    assert sorted(k for k in keys if isinstance(k, bytes)) == [b"raw", b"\xff\xfe"]
    assert sorted(k for k in keys if isinstance(k, str)) == ["text", "\u263a"]
    assert sorted(c.get_keys(0), key=repr) == sorted(keys, key=repr)


@pytest.mark.parametrize("key", ["", " ", "x" * 1024, b"", b"\x00", b"\x00\x01\x02"], ids=repr)
def test_unusual_keys(cache, key):
    """Perl t/1: empty key, a space, a 1 KB key."""
    c = cache(num_pages=3)
    assert c.exists(key) is False
    assert c.get(key) is None
    assert c.set(key, "value") is True
    assert c.exists(key) is True
    assert c.get(key) == "value"
    assert list(c.keys()) == [key]
    assert c.remove(key) is True
    assert c.exists(key) is False


def test_keys_differing_only_after_a_nul_are_distinct(cache):
    c = cache(num_pages=3)
    c[b"a\x00b"] = 1
    c[b"a\x00c"] = 2
    c[b"a"] = 3
    assert (c[b"a\x00b"], c[b"a\x00c"], c[b"a"]) == (1, 2, 3)


# ---------------------------------------------------------------- methods


def test_exists_remove_expire(cache):
    c = cache(num_pages=3)
    c.set("k", "v")
    assert c.exists("k") is True
    assert c.remove("k") is True
    assert c.remove("k") is False
    assert c.exists("k") is False
    c.set("k", "v")
    c.expire("k")
    assert c.exists("k") is False
    c.expire("never-set")  # not an error
    assert len(c) == 0


def test_get_and_remove(cache):
    c = cache(num_pages=3)
    c.set("k", [1, 2])
    assert c.get_and_remove("k") == [1, 2]
    assert "k" not in c
    assert c.get_and_remove("k") is None


def test_get_and_set(cache):
    c = cache(num_pages=3)
    seen = []

    def incr(key, old):
        seen.append((key, old))
        return (old or 0) + 1

    assert c.get_and_set("n", incr) == 1
    assert c.get_and_set("n", incr) == 2
    assert c["n"] == 2
    assert seen == [("n", None), ("n", 1)]
    # The function's result is stored with its type, whatever it is.
    assert c.get_and_set("n", lambda k, v: {"was": v}) == {"was": 2}
    assert c["n"] == {"was": 2}
    assert c.get_and_set("n", lambda k, v: b"raw") == b"raw"
    assert type(c["n"]) is bytes


def test_clear(cache):
    c = cache(num_pages=5)
    for i in range(200):
        c[f"k{i}"] = i
    assert len(c) == 200
    c.clear()
    assert len(c) == 0
    assert list(c) == []
    assert c.get("k1") is None
    c["after"] = 1
    assert c["after"] == 1


def test_empty(cache):
    c = cache(num_pages=3)
    c.update({"a": 1, "b": 2})
    c.empty()
    assert len(c) == 0


def test_get_keys_modes(cache):
    c = cache(num_pages=3)
    c._set_time_override(1_700_000_000)
    c.set("a", 1)
    c.set(b"b", "two", expire_time=60)
    assert sorted(c.get_keys(), key=repr) == ["a", b"b"]
    assert sorted(c.get_keys(0), key=repr) == ["a", b"b"]

    m1 = sorted(c.get_keys(1), key=lambda d: repr(d["key"]))
    assert [set(d) for d in m1] == [{"key", "last_access", "expire_on", "flags"}] * 2
    assert [d["key"] for d in m1] == ["a", b"b"]
    assert m1[0]["last_access"] == 1_700_000_000
    assert m1[0]["expire_on"] == 0
    assert m1[1]["expire_on"] == 1_700_000_060
    assert all(isinstance(d["flags"], int) for d in m1)

    m2 = sorted(c.get_keys(2), key=lambda d: repr(d["key"]))
    assert [set(d) for d in m2] == [{"key", "last_access", "expire_on", "flags", "value"}] * 2
    assert [(d["key"], d["value"]) for d in m2] == [("a", 1), (b"b", "two")]
    assert type(m2[1]["value"]) is str


def test_get_keys_of_empty_cache(cache):
    c = cache(num_pages=3)
    assert c.get_keys(0) == []
    assert c.get_keys(1) == []
    assert c.get_keys(2) == []


def test_multi_set_multi_get(cache):
    c = cache(num_pages=7)
    c.multi_set("user:1", {"name": "ann", "age": 33, b"raw": b"\x00\x01"})
    got = c.multi_get("user:1", ["name", "age", b"raw", "missing"])
    assert got["name"] == "ann"
    assert got["age"] == 33
    assert got[b"raw"] == b"\x00\x01" and type(got[b"raw"]) is bytes
    assert got.get("missing") is None
    # A second group is independent of the first.
    c.multi_set("user:2", {"name": "bob"})
    assert c.multi_get("user:2", ["name", "age"]).get("age") is None
    assert c.multi_get("user:1", ["name"])["name"] == "ann"
    assert c.multi_get("user:3", []) == {}


def test_multi_set_overwrites(cache):
    c = cache(num_pages=7)
    c.multi_set("p", {"a": 1, "b": 2})
    c.multi_set("p", {"a": 10})
    got = c.multi_get("p", ["a", "b"])
    assert (got["a"], got["b"]) == (10, 2)


def test_repaired_pages_starts_at_zero(cache):
    c = cache(num_pages=3)
    assert c.repaired_pages() == 0


def test_properties_are_read_only(cache):
    c = cache(num_pages=3, page_size=4096, expire_time=10)
    for name in ("share_file", "page_size", "num_pages", "cache_size", "expire_time"):
        value = getattr(c, name)
        with pytest.raises(AttributeError):
            setattr(c, name, value)
        assert getattr(c, name) == value


def test_module_exports():
    assert issubclass(fastmmap.Error, Exception)
    assert issubclass(fastmmap.LockTimeout, fastmmap.Error)
    assert issubclass(fastmmap.LockTimeout, TimeoutError)


# ---------------------------------------------------------------- references and leaks


def test_no_reference_leaks_on_success_paths(cache):
    c = cache(num_pages=3)
    key = "".join(["ref", "key"])  # a fresh, non-interned object
    bkey = bytes(bytearray(b"bytes-key"))
    value = [1, 2, 3]
    default = object()
    fn = lambda k, v: value  # noqa: E731
    counts = [sys.getrefcount(o) for o in (key, bkey, value, default, fn)]
    for _ in range(100):
        c.set(key, value)
        c.get(key)
        c[bkey] = value
        c[bkey]
        key in c
        c.exists(key)
        c.get("missing", default)
        c.get_and_set(key, fn)
        c.multi_set(key, {bkey: value})
        c.multi_get(key, [bkey])
        c.get_keys(2)
        c.get_and_remove(bkey)
        c.remove(key)
    assert [sys.getrefcount(o) for o in (key, bkey, value, default, fn)] == counts


def test_no_reference_leaks_on_error_paths(cache):
    c = cache(num_pages=1, page_size=4096)
    key = "".join(["ref", "key"])
    big = b"x" * 10_000
    fn_raises = lambda k, v: 1 / 0  # noqa: E731
    counts = [sys.getrefcount(o) for o in (key, big, fn_raises)]
    for _ in range(100):
        assert c.set(key, big) is False
        with pytest.raises(ValueError):
            c[key] = big
        with pytest.raises(KeyError):
            c[key]
        with pytest.raises(ZeroDivisionError):
            c.get_and_set(key, fn_raises)
        with pytest.raises(TypeError):
            c.set(key, threading.Lock())
    assert [sys.getrefcount(o) for o in (key, big, fn_raises)] == counts


def test_no_memory_growth_under_churn(cache):
    c = cache(num_pages=3)

    def churn():
        for i in range(300):
            k = f"k{i % 40}"
            c.set(k, {"i": i, "pad": "x" * (i % 50)})
            c.get(k)
            c[f"b{i % 40}"] = b"v" * (i % 100)
            c.get(f"b{i % 40}")
            c.get_and_set("n", lambda key, v: (v or 0) + 1)
            c.get("missing")
            try:
                c["missing"]
            except KeyError:
                pass
        c.get_keys(2)
        list(c.items())

    churn()
    gc.collect()
    tracemalloc.start()
    try:
        churn()
        gc.collect()
        base, _ = tracemalloc.get_traced_memory()
        for _ in range(5):
            churn()
        gc.collect()
        now, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert now - base < 64 * 1024, f"memory grew by {now - base} bytes over 5 churn rounds"
