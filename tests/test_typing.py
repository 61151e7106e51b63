"""Type information: fastmmap ships py.typed and a stub for its C extension.

- ``mypy --strict`` passes on the package's source (src/fastmmap, with the
  stub src/fastmmap/_fastmmap.pyi standing in for the extension);
- ``mypy --strict`` passes on examples/typed_usage.py against the *installed*
  package, which fails if py.typed or the stub did not ship;
- ``stubtest`` finds the installed stub consistent with the installed
  extension: names, positional-only markers and defaults of every method
  (from the C signature docstrings), and the constants' values;
- the example runs.

Each check is a subprocess (mypy and the example need not share this
process); mypy reads its configuration, if any, from pyproject.toml.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy", reason="mypy is in the test extra")

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_SRC = ROOT / "src" / "fastmmap"
EXAMPLE = ROOT / "examples" / "typed_usage.py"
ALLOWLIST = Path(__file__).resolve().parent / "stubtest_allowlist.txt"
CONFIG = ROOT / "pyproject.toml"

# Below pytest-timeout's 300 s for the whole test.
TIMEOUT = 240


def _run(args: list[str], cwd: Path, timeout: float = TIMEOUT) -> None:
    """Run ``python *args`` in cwd; fail with its output unless it exits 0."""
    cmd = [sys.executable, *args]
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        # (TimeoutExpired keeps bytes even with text=True)
        out, err = (
            x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr)
        )
        pytest.fail(
            f"{' '.join(args)} did not finish in {timeout} s\n--- stdout\n{out}\n--- stderr\n{err}",
            pytrace=False,
        )
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(args)} exited with status {proc.returncode}\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}",
            pytrace=False,
        )


def _config(option: str) -> list[str]:
    return [option, str(CONFIG)] if CONFIG.is_file() else []


def _mypy(*args: str) -> list[str]:
    return ["-m", "mypy", "--strict", *_config("--config-file"), *args]


def test_py_typed_and_stub_are_installed() -> None:
    import fastmmap

    installed = Path(fastmmap.__file__).parent
    for name in ("py.typed", "_fastmmap.pyi"):
        assert (installed / name).is_file(), f"{name} missing from the installed package in {installed}"


@pytest.mark.skipif(not PACKAGE_SRC.is_dir(), reason="needs the source tree")
def test_mypy_strict_package_source(tmp_path: Path) -> None:
    # The source files, not the installed copy: mypy silences errors in
    # site-packages.  The stub src/fastmmap/_fastmmap.pyi stands in for the
    # extension; the cache goes to tmp_path, not into the tree.
    _run(_mypy("--cache-dir", str(tmp_path / "mypy-cache"), str(PACKAGE_SRC)), cwd=ROOT)


@pytest.mark.skipif(not EXAMPLE.is_file(), reason="needs the source tree")
def test_mypy_strict_typed_example(tmp_path: Path) -> None:
    # From tmp_path: `import fastmmap` resolves to the installed package.
    _run(_mypy("--cache-dir", str(tmp_path / "mypy-cache"), str(EXAMPLE)), cwd=tmp_path)


def test_stubtest(tmp_path: Path) -> None:
    # From tmp_path: stub and runtime are both the installed package.
    allowlist = ["--allowlist", str(ALLOWLIST)] if ALLOWLIST.is_file() else []
    _run(
        ["-m", "mypy.stubtest", "fastmmap", *allowlist, *_config("--mypy-config-file")],
        cwd=tmp_path,
    )


@pytest.mark.skipif(not EXAMPLE.is_file(), reason="needs the source tree")
def test_typed_example_runs(tmp_path: Path) -> None:
    _run([str(EXAMPLE)], cwd=tmp_path, timeout=60)
