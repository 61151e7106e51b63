"""Every row of README.rst's "Bad input" table: the call raises the stated
exception and leaves the cache unchanged.  The table is read from the
README, so the documentation and the behaviour cannot drift apart."""

import os
import pickle
import re
from pathlib import Path

import pytest

import fastmmap

README = Path(__file__).resolve().parent.parent / "README.rst"


def _rows():
    text = README.read_text(encoding="utf-8")
    table = text.split(".. bad-input-table-start", 1)[1].split(".. bad-input-table-end", 1)[0]
    cells = re.findall(r"\* - ``(.+?)``\n\s+- ``(.+?)``", table)
    assert len(cells) >= 30, "the README's bad-input table was not found"
    return cells


ROWS = _rows()


def _snapshot(c):
    return sorted(((repr(k), repr(v)) for k, v in c.items()))


@pytest.mark.parametrize("code, exc_name", ROWS, ids=[code for code, _ in ROWS])
def test_readme_bad_input_row(tmp_path, code, exc_name):
    exc = eval(exc_name, {"fastmmap": fastmmap, "pickle": pickle})
    path = str(tmp_path / "c.cache")
    c = fastmmap.Cache(path, num_pages=2, page_size="8k")
    c["k"] = b"old"
    c["n"] = 41
    c[b"b"] = "text"
    closed = fastmmap.Cache(str(tmp_path / "closed.cache"), num_pages=1, page_size="4k")
    closed.close()
    junk = str(tmp_path / "junk")
    with open(junk, "wb") as f:
        f.write(os.urandom(10000))
    a_dir = str(tmp_path / "a_dir")
    os.mkdir(a_dir)
    before = _snapshot(c)
    files_before = sorted(os.listdir(tmp_path))
    ns = {"c": c, "closed": closed, "junk": junk, "a_dir": a_dir, "fastmmap": fastmmap}
    try:
        with pytest.raises(exc):
            exec(code, ns)
        assert _snapshot(c) == before, "the cache changed"
        assert sorted(os.listdir(tmp_path)) == files_before, "files were created or removed"
        assert c.check() == []
    finally:
        c.close()
