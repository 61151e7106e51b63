"""serializer= and compressor= (Cache::FastMmap t/8, t/13, t/19).

Every entry's flags record how its value was encoded (type in the low bits,
compression in 0x18: 0x08 zlib, 0x10 lz4, 0x18 custom), so a reader decodes
an entry whatever serializer/compressor it was itself opened with.  bytes and
str values are always stored natively, never through the serializer.
"""

from __future__ import annotations

import json
import pickle
import sys
import zlib

import pytest

import fastmmap

COMP_MASK = 0x18
C_NONE, C_ZLIB, C_LZ4, C_CUSTOM = 0x00, 0x08, 0x10, 0x18


def flags_of(c, key):
    [flags] = [d["flags"] for d in c.get_keys(1) if d["key"] == key]
    return flags


def entry_of(c, key):
    [entry] = [d for d in c.get_keys(1) if d["key"] == key]
    return entry


def need_lz4():
    pytest.importorskip("lz4.frame")


# ---------------------------------------------------------------- custom codecs


class Counting:
    """A (dumps, loads) pair that counts its calls and tags its output."""

    def __init__(self):
        self.dumps_calls = 0
        self.loads_calls = 0

    def dumps(self, obj):
        self.dumps_calls += 1
        return b"CUSTOM:" + pickle.dumps(obj)

    def loads(self, data):
        self.loads_calls += 1
        assert data.startswith(b"CUSTOM:"), data[:20]
        return pickle.loads(data[len(b"CUSTOM:"):])

    @property
    def pair(self):
        return (self.dumps, self.loads)


def custom_compress(data):
    return b"Z" + zlib.compress(data)


def custom_decompress(data):
    assert data[:1] == b"Z", data[:10]
    return zlib.decompress(data[1:])


CUSTOM_COMPRESSOR = (custom_compress, custom_decompress)


def compressor_option(name):
    if name == "lz4":
        need_lz4()
    return {"none": None, "zlib": "zlib", "lz4": "lz4", "custom": CUSTOM_COMPRESSOR}[name]


COMP_FLAG = {"none": C_NONE, "zlib": C_ZLIB, "lz4": C_LZ4, "custom": C_CUSTOM}


# ---------------------------------------------------------------- serializers


def test_pickle_is_the_default(cache):
    c = cache()
    value = {"list": [1, 2.5, None, True], "tuple": (1, "x"), "set": {1, 2}, "bytes": b"\x00\xff"}
    assert c.set("k", value) is True
    assert c.get("k") == value
    assert type(c.get("k")["tuple"]) is tuple
    # the same as serializer="pickle" given explicitly
    c2 = cache(c.share_file, serializer="pickle")
    assert c2.get("k") == value


def test_t8_default_serializer_round_trips(cache):
    c = cache()
    values = {"list": [1, 2, [3, 4]], "undef": None, "utf8": "\u263a\u00e9", "dict": {"a": {"b": [1]}}}
    for k, v in values.items():
        assert c.set(k, v) is True
    for k, v in values.items():
        assert c.get(k) == v
    assert sorted(c.get_keys(0)) == sorted(values)
    assert {d["key"]: d["value"] for d in c.get_keys(2)} == values


def test_json_serializer(cache):
    c = cache(serializer="json")
    value = {"a": [1, 2.5, None, True, "\u263a"], "n": {"x": -3}}
    assert c.set("k", value) is True
    assert c.get("k") == value
    # JSON semantics: tuples come back as lists
    c.set("t", (1, 2))
    assert c.get("t") == [1, 2]
    # the stored bytes really are JSON
    c.set("n", 12)
    assert c.get("n") == 12


@pytest.mark.parametrize("raw", [None, "raw"])
def test_raw_serializer_accepts_bytes_str_and_none(cache, raw):
    c = cache(serializer=raw)
    for k, v in {"b": b"\x00bytes\xff", "s": "str \u263a", "empty": b"", "none": None}.items():
        assert c.set(k, v) is True
        assert c.get(k, "<miss>") == v
        assert type(c.get(k, "<miss>")) is type(v)


@pytest.mark.parametrize("raw", [None, "raw"])
@pytest.mark.parametrize("value", [1, 2.5, [1], {"a": 1}, (1,), object()], ids=repr)
def test_raw_serializer_rejects_other_values(cache, raw, value):
    c = cache(serializer=raw)
    c.set("k", b"old")
    with pytest.raises(TypeError):
        c.set("k", value)
    assert c.get("k") == b"old"


def test_custom_serializer_pair(cache):
    codec = Counting()
    c = cache(serializer=codec.pair)
    value = {"x": [1, 2, {3}]}
    assert c.set("k", value) is True
    assert codec.dumps_calls == 1
    assert c.get("k") == value
    assert codec.loads_calls == 1


@pytest.mark.parametrize("serializer", ["pickle", "json", "custom"])
def test_bytes_and_str_bypass_the_serializer(cache, serializer):
    codec = Counting()
    if serializer == "custom":
        opt = codec.pair
    else:
        opt = serializer
    c = cache(serializer=opt)
    assert c.set("b", b"raw bytes") is True
    assert c.set("s", "text \u263a") is True
    c.multi_set("pk", {"b": b"mb", "s": "ms"})
    assert c.get_and_set("g", lambda k, v: "gs") == "gs"
    assert c.add("a", b"ab") is True
    assert codec.dumps_calls == 0
    assert c.get("b") == b"raw bytes" and type(c.get("b")) is bytes
    assert c.get("s") == "text \u263a" and type(c.get("s")) is str
    assert c.multi_get("pk", ["b", "s"]) == {"b": b"mb", "s": "ms"}
    assert c.get("g") == "gs" and c.get("a") == b"ab"
    assert codec.loads_calls == 0
    # stored natively: a cache with no serializer at all reads them
    raw = cache(c.share_file, serializer="raw")
    assert raw.get("b") == b"raw bytes" and raw.get("s") == "text \u263a"
    # and anything else does go through the custom serializer
    if serializer == "custom":
        c.set("obj", [1, 2])
        assert codec.dumps_calls == 1
        assert c.get("obj") == [1, 2]
        assert codec.loads_calls == 1


def test_readers_decode_by_entry_flags_not_by_their_own_serializer(cache):
    pk = cache(serializer="pickle")
    js = cache(pk.share_file, serializer="json")
    raw = cache(pk.share_file, serializer="raw")
    zl = cache(pk.share_file, serializer="json", compressor="zlib", compress_threshold=0)

    pk.set("from-pickle", {"t": (1, 2), "s": {3}})
    js.set("from-json", {"l": [1, 2], "x": None})
    zl.set("from-zlib", {"big": "z" * 5000})
    assert flags_of(zl, "from-zlib") & COMP_MASK == C_ZLIB

    assert pk.get("from-pickle") == {"t": (1, 2), "s": {3}}
    assert type(pk.get("from-pickle")["t"]) is tuple  # decoded with pickle, not json
    for reader in (pk, js, raw, zl):
        assert reader.get("from-json") == {"l": [1, 2], "x": None}
        assert reader.get("from-zlib") == {"big": "z" * 5000}
    assert {d["key"]: d["value"] for d in pk.get_keys(2)} == {
        "from-pickle": {"t": (1, 2), "s": {3}},
        "from-json": {"l": [1, 2], "x": None},
        "from-zlib": {"big": "z" * 5000},
    }


def test_only_a_pickle_cache_unpickles(cache):
    """Unpickling runs code from the file: a cache opened with another
    serializer refuses pickle entries instead of running them."""
    pk = cache(serializer="pickle")
    pk.set("p", {"x": 1})
    for opt in ("json", "raw", (repr, eval)):
        reader = cache(pk.share_file, serializer=opt)
        with pytest.raises(fastmmap.Error, match="stored with pickle"):
            reader.get("p")
        assert reader.exists("p")  # still there, untouched


def test_custom_value_without_the_serializer_is_a_clear_error(cache):
    codec = Counting()
    writer = cache(serializer=codec.pair)
    writer.set("k", {"a": 1})
    writer.multi_set("pk", {"m": [1]})
    for opt in ("pickle", "json", "raw"):
        reader = cache(writer.share_file, serializer=opt)
        with pytest.raises(fastmmap.Error, match="custom serializer"):
            reader.get("k")
        with pytest.raises(fastmmap.Error, match="custom serializer"):
            reader["k"]
        with pytest.raises(fastmmap.Error, match="custom serializer"):
            reader.multi_get("pk", ["m"])
        # the entry is still there and the page is not left locked
        assert reader.exists("k")
        reader.set("other", "fine")
        assert reader.get("other") == "fine"
    assert writer.get("k") == {"a": 1}


def test_custom_compressed_value_without_the_compressor_is_a_clear_error(cache):
    writer = cache(compressor=CUSTOM_COMPRESSOR, compress_threshold=0)
    writer.set("k", "c" * 1000)
    assert flags_of(writer, "k") & COMP_MASK == C_CUSTOM
    reader = cache(writer.share_file)
    with pytest.raises(fastmmap.Error, match="custom compressor"):
        reader.get("k")
    assert writer.get("k") == "c" * 1000


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"serializer": "yaml"}, ValueError),
        ({"serializer": "storable"}, ValueError),
        ({"serializer": (pickle.dumps,)}, ValueError),
        ({"serializer": (pickle.dumps, 1)}, TypeError),
        ({"compressor": "snappy"}, ValueError),
        ({"compressor": (zlib.compress, "x")}, TypeError),
        ({"compress_threshold": -1}, ValueError),
        ({"compress_threshold": 1.5}, ValueError),
    ],
    ids=repr,
)
def test_bad_serializer_or_compressor_options(cache, kwargs, exc):
    with pytest.raises(exc):
        cache(**kwargs)


# ---------------------------------------------------------------- compressors


@pytest.mark.parametrize("comp", ["zlib", "lz4", "custom"])
def test_compress_threshold(cache, comp):
    c = cache(compressor=compressor_option(comp), compress_threshold=100)
    c.set("short", "a" * 99)
    c.set("long", "a" * 100)
    c.set("short-b", b"b" * 99)
    c.set("long-b", b"b" * 1000)
    c.set("obj", ["x" * 500])  # threshold applies to the serialized bytes
    assert flags_of(c, "short") & COMP_MASK == C_NONE
    assert flags_of(c, "short-b") & COMP_MASK == C_NONE
    assert flags_of(c, "long") & COMP_MASK == COMP_FLAG[comp]
    assert flags_of(c, "long-b") & COMP_MASK == COMP_FLAG[comp]
    assert flags_of(c, "obj") & COMP_MASK == COMP_FLAG[comp]
    assert c.get("short") == "a" * 99 and c.get("long") == "a" * 100
    assert c.get("short-b") == b"b" * 99 and c.get("long-b") == b"b" * 1000
    assert c.get("obj") == ["x" * 500]


def test_default_threshold_and_no_compressor(cache):
    c = cache()
    c.set("k", "a" * 10000)
    assert flags_of(c, "k") & COMP_MASK == C_NONE
    z = cache(compressor="zlib")  # default threshold: small values stay plain
    z.set("tiny", "a" * 20)
    z.set("big", "a" * 10000)
    assert flags_of(z, "tiny") & COMP_MASK == C_NONE
    assert flags_of(z, "big") & COMP_MASK == C_ZLIB


@pytest.mark.parametrize("comp", ["zlib", "lz4", "custom"])
def test_incompressible_values_round_trip(cache, comp, rand):
    c = cache(compressor=compressor_option(comp), compress_threshold=0)
    data = rand.randbytes(3000)
    c.set("k", data)
    assert c.get("k") == data


@pytest.mark.parametrize("comp", ["zlib", "lz4", "custom"])
@pytest.mark.parametrize("kind", ["str", "bytes", "pickled"])
def test_t13_value_fits_a_page_only_when_compressed(cache, comp, kind):
    value = {"str": "abcdefgh" * 1280, "bytes": b"abcdefgh" * 1280, "pickled": ["abcdefgh" * 1280]}[kind]
    plain = cache(num_pages=1, page_size="8k")
    packed = cache(num_pages=1, page_size="8k", compressor=compressor_option(comp))
    plain.set("k", "old")
    packed.set("k", "old")
    assert plain.set("k", value) is False  # 10 KB never fits an 8 KB page
    assert plain.get("k") == "old"
    assert packed.set("k", value) is True
    assert packed.get("k") == value
    assert flags_of(packed, "k") & COMP_MASK == COMP_FLAG[comp]
    # any reader (with the builtin codecs) can decompress it
    if comp != "custom":
        assert cache(packed.share_file).get("k") == value


def test_lz4_missing_gives_an_install_hint(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "lz4", None)
    monkeypatch.setitem(sys.modules, "lz4.frame", None)
    with pytest.raises(ImportError, match=r"pip install fastmmap\[lz4\]"):
        cache(compressor="lz4")


def test_lz4_entries_readable_by_a_cache_without_a_compressor(cache):
    need_lz4()
    w = cache(compressor="lz4", compress_threshold=0)
    w.set("k", {"v": "q" * 4000})
    assert flags_of(w, "k") & COMP_MASK == C_LZ4
    r = cache(w.share_file)
    assert r.get("k") == {"v": "q" * 4000}


# ---------------------------------------------------------------- serializer x compressor


def values_for(ser):
    big_text = "compressible text " * 400
    if ser == "raw":
        return {"b": b"\x00\x01bytes", "s": "str \u263a", "none": None, "big-b": big_text.encode(), "big-s": big_text}
    if ser == "json":
        return {
            "dict": {"a": [1, 2.5, None, True, "\u263a"]},
            "list": [1, "two", [3]],
            "int": 42,
            "b": b"bytes",
            "s": "str",
            "none": None,
            "big": {"text": big_text, "n": list(range(50))},
        }
    return {  # pickle and custom take any picklable object
        "dict": {"t": (1, 2), "set": {3, 4}, "b": b"\xff"},
        "complex": 1 + 2j,
        "int": 7,
        "b": b"bytes",
        "s": "str",
        "none": None,
        "big": {"text": big_text, "tuple": tuple(range(50))},
    }


@pytest.mark.parametrize("comp", ["none", "zlib", "lz4", "custom"])
@pytest.mark.parametrize("ser", ["pickle", "json", "raw", "custom"])
def test_serializer_compressor_matrix(cache, ser, comp):
    codec = Counting()
    ser_opt = codec.pair if ser == "custom" else ser
    c = cache(serializer=ser_opt, compressor=compressor_option(comp))
    values = values_for(ser)
    for k, v in values.items():
        assert c.set(k, v) is True, k
    for k, v in values.items():
        got = c.get(k, "<miss>")
        assert got == v, k
        assert type(got) is type(v), k
    # big values were compressed (with the default threshold), small ones not
    big = [k for k in values if k.startswith("big")]
    for k in big:
        assert flags_of(c, k) & COMP_MASK == COMP_FLAG[comp], k
    assert flags_of(c, "none") & COMP_MASK == C_NONE
    # the other paths that encode and decode
    c.multi_set("pk", values)
    assert c.multi_get("pk", list(values)) == values
    assert {d["key"]: d["value"] for d in c.get_keys(2) if d["key"] in values} == values
    assert c.get_and_set("gs", lambda k, v: values[big[0]]) == values[big[0]]
    assert c.get("gs") == values[big[0]]
    with c.lock("lk") as e:
        e.value = values[big[0]]
        assert e.value == values[big[0]]
    assert c.get("lk") == values[big[0]]
    # a second handle with the same options reads everything
    c2 = cache(c.share_file, serializer=ser_opt, compressor=compressor_option(comp))
    for k, v in values.items():
        assert c2.get(k, "<miss>") == v
    if ser == "custom":
        assert codec.dumps_calls > 0 and codec.loads_calls > 0


# ---------------------------------------------------------------- unserializable values


def serializer_error(dumps, obj):
    """The exception type the serializer itself raises for obj."""
    try:
        dumps(obj)
    except Exception as e:  # noqa: BLE001
        return type(e)
    raise AssertionError(f"{obj!r} serialized")


class Unserializable(Exception):
    pass


def refusing_dumps(obj):
    if isinstance(obj, list) and obj and obj[0] == "refuse":
        raise Unserializable("custom dumps refused")
    return pickle.dumps(obj)


@pytest.mark.parametrize(
    "ser, bad",
    [("pickle", lambda: 1), ("json", {1, 2}), ("json", object()), ("raw", [1]), ("custom", ["refuse"])],
    ids=["pickle-lambda", "json-set", "json-object", "raw-list", "custom-raises"],
)
def test_unserializable_value_raises_and_keeps_the_old_entry(cache, ser, bad):
    exc = {
        "pickle": lambda: serializer_error(lambda o: pickle.dumps(o, pickle.HIGHEST_PROTOCOL), bad),
        "json": lambda: serializer_error(json.dumps, bad),
        "raw": lambda: TypeError,
        "custom": lambda: Unserializable,
    }[ser]()
    assert exc is not Exception
    ser_opt = (refusing_dumps, pickle.loads) if ser == "custom" else ser
    c = cache(serializer=ser_opt, lock_timeout=1)
    old = "old value" if ser == "raw" else {"old": [1, 2]}
    assert c.set("k", old, expire_time=3600) is True
    before = entry_of(c, "k")

    with pytest.raises(exc):
        c.set("k", bad)
    with pytest.raises(exc):
        c["k"] = bad
    with pytest.raises(exc):
        c.get_and_set("k", lambda k, v: bad)
    with pytest.raises(exc):
        c.add("new", bad)
    with pytest.raises(exc):
        c.multi_set("pk", {"a": "fine", "b": bad})
    with pytest.raises(exc):
        with c.lock("k") as e:
            e.value = bad

    assert c.get("k") == old
    after = entry_of(c, "k")
    assert (after["flags"], after["expire_on"]) == (before["flags"], before["expire_on"])
    assert not c.exists("new")
    assert c.multi_get("pk", ["a", "b"]) == {}  # multi_set stored nothing
    # nothing left locked
    assert c.set("k", "next") is True and c.get("k") == "next"


@pytest.mark.parametrize(
    "opts",
    [
        {"serializer": (lambda obj: 12345, pickle.loads)},
        {"compressor": (lambda data: "not bytes", zlib.decompress), "compress_threshold": 50},
    ],
    ids=["dumps-returns-int", "compress-returns-str"],
)
def test_codec_returning_non_bytes_is_a_type_error(cache, opts):
    c = cache(lock_timeout=1, **opts)
    c.set("k", b"old")  # bytes, shorter than the threshold: no codec runs
    with pytest.raises(TypeError):
        c.set("k", ["new"] * 100)
    assert c.get("k") == b"old"
    assert c.set("k", b"next") is True and c.get("k") == b"next"
