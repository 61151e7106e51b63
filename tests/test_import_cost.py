"""`import fastmmap` stays cheap: the heavy modules that only some options
or features need (asyncio for async memoize, json and zlib for those
serializer/compressor options, the frameworks of fastmmap.contrib) are
imported when first used, not with the package."""

from __future__ import annotations

import subprocess
import sys

# Each of these took a measurable share of `import fastmmap` when it was
# imported at module level (asyncio alone about two thirds).
LAZY = ("asyncio", "json", "zlib", "tempfile", "shutil", "inspect", "hashlib", "random",
        "django", "flask", "flask_caching", "cachelib", "redis", "lz4")


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
