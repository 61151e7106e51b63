"""multi_set stores its whole batch or none of it: when the items do not fit
together, when one item can never fit, and when the writer is SIGKILLed
between two items (at every boundary, through the engine's fault hook).
It takes what update() takes and follows the size rule of set()."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

import fastmmap

pytestmark = pytest.mark.timeout(120)

FORMATS = ["native", "perl"]


def _open(cache, fmt: str, **kw: Any) -> fastmmap.Cache:
    kw.setdefault("page_size", "4k")
    kw.setdefault("num_pages", 3)
    if fmt == "perl":
        kw.setdefault("serializer", "raw")
        return cache(format="perl", **kw)
    return cache(**kw)


def _snapshot(c: fastmmap.Cache) -> list[tuple[str, str]]:
    return sorted((repr(k), repr(v)) for k, v in c.items())


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_batch_too_big_for_its_page_stores_nothing_and_evicts_nothing(cache, fmt):
    c = _open(cache, fmt)
    c.multi_set("p", {"small": b"kept"})
    c["other"] = b"also kept"
    before = _snapshot(c)
    batch = {f"k{i}": bytes([65 + i]) * 1536 for i in range(5)}  # 7.5 KiB for a 4 KiB page
    with pytest.raises(fastmmap.ItemTooLargeError, match="5 items need"):
        c.multi_set("p", batch)
    assert _snapshot(c) == before
    assert c.multi_get("p", list(batch)) == {}
    assert c.check() == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_one_item_that_can_never_fit_stores_none(cache, fmt):
    c = _open(cache, fmt)
    c.multi_set("p", {"a": b"old"})
    before = _snapshot(c)
    with pytest.raises(fastmmap.ItemTooLargeError, match="'huge'"):
        c.multi_set("p", {"a": b"new", "huge": b"x" * c.max_item_size, "z": b"z"})
    assert _snapshot(c) == before


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_batch_that_fits_after_eviction_is_stored_whole(cache, fmt):
    c = _open(cache, fmt, num_pages=1)
    for i in range(40):
        c[f"filler{i}"] = b"f" * 40
    batch = {"a": b"A" * 1500, "b": b"B" * 1500}
    c.multi_set("p", batch)
    assert c.multi_get("p", ["a", "b"]) == batch
    c.multi_set("p", {"a": b"a" * 1400, "b": b"b" * 1400})  # over itself
    assert c.multi_get("p", ["a", "b"]) == {"a": b"a" * 1400, "b": b"b" * 1400}
    assert c.check() == []


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("below", [0, 1, 2, 3])
def test_multi_set_takes_every_size_set_takes(cache, fmt, below):
    """One size rule: an item of len(key) + len(value) == max_item_size -
    below is stored by set(), in a page() block and by multi_set."""
    c = _open(cache, fmt)
    key = b"p-k"  # what multi_set("p", {"k": ...}) stores
    value = b"v" * (c.max_item_size - below - len(key))
    assert c.set(key, value) is True
    with c.page("p") as pg:
        pg["k"] = value
    c.multi_set("p", {"k": value})
    assert c.multi_get("p", ["k"]) == {"k": value}
    too_big = value + b"v" * (below + 1)
    assert c.set(key, too_big) is False
    with pytest.raises(fastmmap.ItemTooLargeError):
        c.multi_set("p", {"k": too_big})
    assert c.multi_get("p", ["k"]) == {"k": value}


class _KeysOnly(Mapping[str, int]):
    def __init__(self, d: dict[str, int]) -> None:
        self._d = d

    def __getitem__(self, k: str) -> int:
        return self._d[k]

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)


def test_multi_set_takes_what_update_takes(cache):
    c = _open(cache, "native")
    c.multi_set("p", [("a", 1), ("b", 2)])
    c.multi_set("p", (pair for pair in [("c", 3)]))
    c.multi_set("p", _KeysOnly({"d": 4}))
    c.multi_set("p", ["ex"])  # a 2-character string is a pair, as for dict.update
    assert c.multi_get("p", ["a", "b", "c", "d", "e"]) == {"a": 1, "b": 2, "c": 3, "d": 4, "e": "x"}
    c.multi_set("p", [("a", 10), ("a", 11)])  # the last one wins, as for update()
    assert c.multi_get("p", ["a"]) == {"a": 11}


@pytest.mark.parametrize(
    "bad, message",
    [
        ("abc", "element #0 of the pairs has length 1, not a .key, value. pair"),
        ([("a", 1), ("b", 2, 3)], "element #1 of the pairs has length 3"),
        ([1], "element #0 of the pairs is int"),
        (5, "mapping or an iterable of .key, value. pairs, not int"),
        (None, "not NoneType"),
    ],
)
def test_multi_set_rejects_what_update_rejects(cache, bad, message):
    c = _open(cache, "native")
    c.multi_set("p", {"a": 1})
    before = _snapshot(c)
    with pytest.raises(TypeError, match=message):
        c.multi_set("p", bad)
    assert _snapshot(c) == before


@pytest.mark.multiprocess
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_writer_killed_between_two_items_leaves_none_of_the_batch(cache, forked, fmt):
    """A SIGKILL at every item boundary of a 4-item batch (k - 1 items
    stored, from before the first to after the last): the page's crash
    marker spans the batch, so the next locker re-initialises the page
    (repaired_pages() counts it) and it holds none of the batch."""
    path = cache.path()
    n = 4
    batch = {f"item{i}": bytes([65 + i]) * 700 for i in range(n)}
    for k in range(1, n + 2):
        c = _open(cache, fmt, share_file=path, num_pages=1, init_file=True)
        c.multi_set("p", {"old": b"before"})
        repaired = c.repaired_pages()

        def writer(c=c, k=k):
            c._set_batch_fault(k)
            c.multi_set("p", batch)

        status = forked.start(writer).wait()
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (k, status)
        got = c.multi_get("p", [*batch, "old"])
        assert got == {}, f"killed after {k - 1} items: the page holds {sorted(got)}"
        assert c.repaired_pages() == repaired + 1
        assert c.check() == []
        # and the same batch, without the fault, is stored whole
        c.multi_set("p", batch)
        assert c.multi_get("p", list(batch)) == batch
        c.close()
