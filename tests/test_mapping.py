"""The MutableMapping protocol, checked directly and against a dict model."""

from __future__ import annotations

import collections.abc

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import fastmmap


def test_is_a_mutable_mapping(cache):
    c = cache(num_pages=3)
    assert isinstance(c, collections.abc.MutableMapping)
    assert isinstance(c, fastmmap.Cache)


def test_getitem_setitem_delitem(cache):
    c = cache(num_pages=3)
    with pytest.raises(KeyError):
        c["k"]
    c["k"] = "v"
    assert c["k"] == "v"
    del c["k"]
    with pytest.raises(KeyError):
        c["k"]
    with pytest.raises(KeyError):
        del c["k"]


def test_keyerror_carries_the_key(cache):
    c = cache(num_pages=3)
    with pytest.raises(KeyError) as info:
        c["missing"]
    assert info.value.args == ("missing",)


def test_contains_len_iter(cache):
    c = cache(num_pages=5)
    expected = {f"k{i}": i for i in range(50)}
    for k, v in expected.items():
        c[k] = v
    assert len(c) == 50
    assert "k7" in c and "nope" not in c
    assert sorted(c) == sorted(expected)
    assert sorted(c.keys()) == sorted(expected)
    assert sorted(c.values()) == sorted(expected.values())
    assert sorted(c.items()) == sorted(expected.items())
    assert dict(c) == expected


def test_iteration_is_a_snapshot(cache):
    c = cache(num_pages=5)
    for i in range(20):
        c[f"k{i}"] = i
    seen = []
    for k in c:  # deleting and adding while iterating must not break iteration
        seen.append(k)
        del c[k]
        c[f"new-{k}"] = 0
    assert sorted(seen) == sorted(f"k{i}" for i in range(20))
    assert len(c) == 20


def test_pop(cache):
    c = cache(num_pages=3)
    c["k"] = [1]
    assert c.pop("k") == [1]
    assert "k" not in c
    with pytest.raises(KeyError):
        c.pop("k")
    assert c.pop("k", "dflt") == "dflt"


def test_popitem(cache):
    c = cache(num_pages=3)
    c["only"] = 1
    assert c.popitem() == ("only", 1)
    assert len(c) == 0
    with pytest.raises(KeyError):
        c.popitem()


def test_setdefault(cache):
    c = cache(num_pages=3)
    assert c.setdefault("k", 5) == 5
    assert c.setdefault("k", 6) == 5
    assert c["k"] == 5


def test_update(cache):
    c = cache(num_pages=3)
    c.update({"a": 1, b"b": 2})
    c.update([("c", 3)])
    c.update(d=4)
    assert dict(c) == {"a": 1, b"b": 2, "c": 3, "d": 4}


def test_get_on_missing_does_not_insert(cache):
    c = cache(num_pages=3)
    c.get("k")
    "k" in c
    c.exists("k")
    assert len(c) == 0


def test_setitem_too_big_raises_valueerror_and_keeps_old(cache):
    c = cache(num_pages=1, page_size=4096)
    c["k"] = "old"
    with pytest.raises(ValueError):
        c["k"] = b"x" * 4096
    assert c["k"] == "old"
    with pytest.raises(ValueError):
        c["other"] = "y" * 10_000
    assert "other" not in c
    assert dict(c) == {"k": "old"}


def test_set_too_big_returns_false_and_keeps_old(cache):
    c = cache(num_pages=1, page_size=4096)
    assert c.set("k", "old") is True
    assert c.set("k", b"x" * 4096) is False
    assert c.get("k") == "old"
    assert c.set("new", b"x" * 4096) is False
    assert "new" not in c


def test_len_and_iteration_skip_expired(cache):
    c = cache(num_pages=3)
    t0 = 1_700_000_000
    c._set_time_override(t0)
    c.set("short", 1, expire_time=5)
    c.set("long", 2, expire_time=100)
    c.set("forever", 3)
    assert len(c) == 3
    c._set_time_override(t0 + 10)
    assert len(c) == 2
    assert sorted(c) == ["forever", "long"]
    assert sorted(c.keys()) == ["forever", "long"]
    assert sorted(c.items()) == [("forever", 3), ("long", 2)]
    assert "short" not in c
    c._set_time_override(t0 + 1000)
    assert list(c) == ["forever"]
    assert len(c) == 1


# ---------------------------------------------------------------- model-based

keys = st.one_of(
    st.text(max_size=6),
    st.binary(max_size=6).filter(lambda b: not _is_utf8(b)),  # bytes that cannot alias a str key
)
values = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.lists(st.integers(), max_size=5),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=3),
)


MISS = object()


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class CacheVsDict(RuleBasedStateMachine):
    """Everything fits (one 64 KiB page holds far more than a run writes),
    so the cache must behave exactly like a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.c = fastmmap.Cache(None, num_pages=2, page_size="64k")
        self.model: dict = {}

    def teardown(self) -> None:
        self.c.close()

    @rule(k=keys, v=values)
    def set(self, k, v):
        assert self.c.set(k, v) is True
        self.model[k] = v

    @rule(k=keys, v=values)
    def setitem(self, k, v):
        self.c[k] = v
        self.model[k] = v

    @rule(k=keys)
    def get(self, k):
        assert self.c.get(k, MISS) == self.model.get(k, MISS)

    @rule(k=keys)
    def delitem(self, k):
        if k in self.model:
            del self.c[k]
            del self.model[k]
        else:
            with pytest.raises(KeyError):
                del self.c[k]

    @rule(k=keys)
    def remove(self, k):
        assert self.c.remove(k) is (self.model.pop(k, MISS) is not MISS)

    @rule(k=keys)
    def get_and_remove(self, k):
        assert self.c.get_and_remove(k) == self.model.pop(k, None)

    @rule(k=keys)
    def increment(self, k):
        def fn(key, old):
            return (old if isinstance(old, int) else 0) + 1

        new = fn(k, self.model.get(k))
        assert self.c.get_and_set(k, fn) == new
        self.model[k] = new

    @rule()
    def clear(self):
        self.c.clear()
        self.model.clear()

    @invariant()
    def same_content(self):
        assert len(self.c) == len(self.model)
        assert dict(self.c.items()) == self.model


CacheVsDict.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    database=None,  # nothing written into the work tree
    suppress_health_check=[HealthCheck.too_slow],
)
test_cache_behaves_like_a_dict = CacheVsDict.TestCase
