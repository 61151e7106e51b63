"""`import fastmmap` stays cheap: the heavy modules that only some options
or features need (asyncio for async memoize, json and zlib for those
serializer/compressor options, pickle for pickled values, datetime for
timedelta expiries, re for size and time strings, the memoize machinery,
the frameworks of fastmmap.contrib) are imported when first used, not with
the package."""

from __future__ import annotations

import subprocess
import sys

# Each of these took a measurable share of `import fastmmap` when it was
# imported at module level (asyncio alone about two thirds).
LAZY = ("asyncio", "json", "zlib", "tempfile", "shutil", "inspect", "hashlib", "random",
        "django", "flask", "flask_caching", "cachelib", "redis", "lz4",
        "pickle", "datetime", "re", "fastmmap._memoize")


def _loaded_after(code: str) -> set[str]:
    probe = code + "\nimport sys\nprint(' '.join(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-I", "-c", probe], check=True, capture_output=True, text=True)
    return set(out.stdout.split())


def test_import_loads_no_optional_module() -> None:
    baseline = _loaded_after("")
    loaded = _loaded_after("import fastmmap")
    assert sorted(m for m in LAZY if m in loaded and m not in baseline) == []


def test_sync_memoize_does_not_load_asyncio(tmp_path: object) -> None:
    loaded = _loaded_after(
        "import fastmmap, os, tempfile\n"
        "d = tempfile.mkdtemp()\n"
        "c = fastmmap.Cache(os.path.join(d, 'c'), init_file=True, cache_size='1m')\n"
        "@c.memoize()\n"
        "def f(x, **kw):\n"
        "    return x * 2\n"
        "assert f(2, a=1) == 4 and f(2, a=1) == 4\n"
    )
    assert "asyncio" not in loaded


def test_json_and_zlib_options_still_work(tmp_path: object) -> None:
    # The lazily imported modules are there when the options ask for them.
    loaded = _loaded_after(
        "import fastmmap, os, tempfile\n"
        "d = tempfile.mkdtemp()\n"
        "c = fastmmap.Cache(os.path.join(d, 'c'), init_file=True, cache_size='1m',\n"
        "                   serializer='json', compressor='zlib', compress_threshold=0)\n"
        "c.set('k', {'a': 'x' * 1000})\n"
        "assert c.get('k') == {'a': 'x' * 1000}\n"
    )
    assert {"json", "zlib"} <= loaded


def test_pickle_memoize_and_timedelta_work_after_a_plain_import(tmp_path: object) -> None:
    # pickle (in the binding and in Share), datetime, re and _memoize are
    # imported on first use: each feature still works from a bare import.
    loaded = _loaded_after(
        "import fastmmap, os, tempfile\n"
        "d = tempfile.mkdtemp()\n"
        "c = fastmmap.Cache(os.path.join(d, 'c'), init_file=True, cache_size='1m')\n"
        "c.set('k', {'a': [1, 2.5]})\n"
        "assert c.get('k') == {'a': [1, 2.5]}\n"
        "r = fastmmap.Cache(os.path.join(d, 'c'), serializer='raw')\n"
        "try:\n"
        "    r.get('k')\n"
        "except fastmmap.Error as e:\n"
        "    assert 'pickle' in str(e)\n"
        "else:\n"
        "    raise AssertionError('raw reader unpickled')\n"
        "s = fastmmap.Share(1000)\n"
        "s.set([1, 2, 3])\n"
        "assert s.get() == [1, 2, 3]\n"
        "@c.memoize(expire_time='10m')\n"
        "def f(x):\n"
        "    return [x]\n"
        "assert f(2) == [2] and f(2) == [2]\n"
        "import datetime\n"
        "c.set('t', 1, expire_time=datetime.timedelta(minutes=5))\n"
        "assert c.get('t') == 1\n"
        "try:\n"
        "    c.set('u', 1, expire_time=datetime.timedelta(seconds=-1))\n"
        "except ValueError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('negative timedelta accepted')\n"
    )
    assert {"pickle", "fastmmap._memoize", "datetime", "re"} <= loaded
