"""Run other projects' own cache test suites against fastmmap's backends.

Django, cachelib, Flask-Caching, cachetools, aiocache and dogpile.cache:
their tests of the parts that any backend (or any mapping, for cachetools)
must pass.

``make test-upstream`` runs this in .venv-upstream, where the projects are
installed at the versions pinned below (tests/upstream/requirements.txt).
For each suite it

1. downloads the project's sdist from PyPI (``pip download --no-binary``)
   into build/upstream/sdist/, once: their code never enters this repo;
2. unpacks it afresh into build/upstream/<suite>/ and copies our small
   test module from tests/upstream/suites/ into their test directory, where
   it subclasses their backend-independent test classes with a fastmmap
   backend (Flask-Caching's whole suite also runs with its ``app`` fixture
   pointed at fastmmap, by fmm_upstream_plugin.py);
3. runs their test runner (pytest, or Django's runtests.py), recording
   each test's outcome, with the tests that tests/upstream/expected/
   <suite>.txt excludes left out;
4. compares: every test that reached a fastmmap backend must pass, at
   least ``min_passed`` of them, and every exclusion must name a test that
   exists (a stale one fails the run).

The expected files hold only test ids and the reason for each exclusion.

    python tests/upstream/run.py [SUITE ...]      # default: all suites
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BUILD = os.path.join(ROOT, "build", "upstream")


@dataclass
class Suite:
    name: str
    dist: str  # PyPI name
    version: str
    sdist_glob: str  # the downloaded file, to find it again
    module_src: str  # ours, in tests/upstream/suites/
    module_dest: str  # where it goes in their tree
    command: list[str]  # run in their tree (cwd = `cwd`)
    cwd: str = "."
    env: dict[str, str] = field(default_factory=dict)
    # Count only the tests that built a fastmmap backend (Flask-Caching's
    # suite, most of which tests Flask-Caching itself on other backends).
    reached_only: bool = False
    # A pytest.ini to write at the top of their tree, for a project that
    # keeps no pytest configuration there: pytest would otherwise look for
    # one further up and find this repository's.
    pytest_ini: str | None = None
    timeout: int = 900


# pytest-asyncio (for aiocache's tests) is installed for every suite: it
# warns, an error under their filterwarnings, unless this is set.
PYTEST = [
    sys.executable, "-m", "pytest", "-p", "fmm_upstream_plugin", "-q", "-rfE",
    "-o", "asyncio_default_fixture_loop_scope=function",
]

SUITES = {
    s.name: s
    for s in [
        Suite(
            name="django",
            dist="django",
            version="5.2.19",
            sdist_glob="[dD]jango-5.2.19.tar.gz",
            module_src="django_tests_fastmmap.py",
            module_dest="tests/cache/tests_fastmmap.py",
            command=[
                sys.executable, "runtests.py", "cache.tests_fastmmap",
                "--settings=fmm_django_settings", "--parallel=1", "-v", "1",
            ],
            cwd="tests",
        ),
        Suite(
            name="cachelib",
            dist="cachelib",
            version="0.17.0",
            sdist_glob="cachelib-0.17.0.tar.gz",
            module_src="cachelib_test_fastmmap.py",
            module_dest="tests/test_fastmmap_cache.py",
            command=PYTEST + ["tests/test_fastmmap_cache.py"],
        ),
        Suite(
            name="flask_caching",
            dist="flask-caching",
            version="2.5.1",
            sdist_glob="[fF]lask[-_][cC]aching-2.5.1.tar.gz",
            module_src="flask_caching_test_fastmmap.py",
            module_dest="tests/test_fastmmap_backend.py",
            # the test classes of the backends that need a server (they
            # would start one if installed): they test other backends
            command=PYTEST + [
                "tests",
                "--deselect", "tests/test_backend_cache.py::TestRedisCache",
                "--deselect", "tests/test_backend_cache.py::TestRedisCacheClientsOverride",
                "--deselect", "tests/test_backend_cache.py::TestMemcachedCache",
            ],
            env={"FMM_UPSTREAM_FLASK_APP": "1"},
            reached_only=True,
        ),
        Suite(
            name="cachetools",
            dist="cachetools",
            version="8.0.3",
            sdist_glob="cachetools-8.0.3.tar.gz",
            module_src="cachetools_test_fastmmap.py",
            module_dest="tests/test_fastmmap.py",
            command=PYTEST + ["tests/test_fastmmap.py"],
            pytest_ini="[pytest]\n",
        ),
        Suite(
            name="aiocache",
            dist="aiocache",
            version="0.12.3",
            sdist_glob="aiocache-0.12.3.tar.gz",
            module_src="aiocache_test_fastmmap.py",
            module_dest="tests/acceptance/test_fastmmap.py",
            # their addopts ask for coverage (pytest-cov), which is not ours to run
            command=PYTEST + ["-o", "addopts=--strict-markers", "tests/acceptance/test_fastmmap.py"],
        ),
        Suite(
            name="dogpile",
            dist="dogpile.cache",
            version="1.5.0",
            sdist_glob="dogpile[._]cache-1.5.0.tar.gz",
            module_src="dogpile_test_fastmmap.py",
            module_dest="tests/cache/test_fastmmap_backend.py",
            command=PYTEST + ["tests/cache/test_fastmmap_backend.py"],
        ),
    ]
}


@dataclass
class Expected:
    min_passed: int = 0
    excluded: dict[str, str] = field(default_factory=dict)  # test id -> reason


def read_expected(path: str) -> Expected:
    """min_passed N, and "exclude ID -- REASON" lines (# starts a comment)."""
    exp = Expected()
    with open(path) as f:
        for n, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            word, _, rest = line.partition(" ")
            if word == "min_passed":
                exp.min_passed = int(rest)
            elif word == "exclude":
                test_id, sep, reason = rest.partition(" -- ")
                if not sep or not reason.strip():
                    raise SystemExit(f"{path}:{n}: an exclusion needs its reason: exclude ID -- REASON")
                exp.excluded[test_id.strip()] = reason.strip()
            else:
                raise SystemExit(f"{path}:{n}: expected 'min_passed N' or 'exclude ID -- REASON', got {line!r}")
    return exp


def fetch_sdist(suite: Suite) -> str:
    sdists = os.path.join(BUILD, "sdist")
    os.makedirs(sdists, exist_ok=True)
    found = glob.glob(os.path.join(sdists, suite.sdist_glob))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             f"{suite.dist}=={suite.version}", "-d", sdists],
            check=True,
        )
        found = glob.glob(os.path.join(sdists, suite.sdist_glob))
    if len(found) != 1:
        raise SystemExit(f"{suite.name}: expected one sdist matching {suite.sdist_glob} in {sdists}, found {found}")
    return found[0]


def unpack(suite: Suite, sdist: str) -> str:
    dest = os.path.join(BUILD, suite.name)
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    with tarfile.open(sdist) as tar:
        tar.extractall(dest, filter="data")
    (top,) = os.listdir(dest)
    tree = os.path.join(dest, top)
    shutil.copyfile(os.path.join(HERE, "suites", suite.module_src), os.path.join(tree, suite.module_dest))
    if suite.pytest_ini is not None:
        with open(os.path.join(tree, "pytest.ini"), "w") as f:
            f.write(suite.pytest_ini)
    return tree


def check_installed(suite: Suite) -> None:
    installed = importlib.metadata.version(suite.dist)
    if installed != suite.version:
        raise SystemExit(
            f"{suite.name}: its tests are those of {suite.dist} {suite.version}, but {installed} is installed; "
            "run through `make test-upstream`, which installs tests/upstream/requirements.txt"
        )


def run_suite(suite: Suite) -> tuple[bool, str]:
    check_installed(suite)
    expected = read_expected(os.path.join(HERE, "expected", suite.name + ".txt"))
    tree = unpack(suite, fetch_sdist(suite))
    with tempfile.TemporaryDirectory(prefix="fmm-upstream-") as tmp:
        exclude_file = os.path.join(tmp, "exclude")
        results_file = os.path.join(tmp, "results.json")
        with open(exclude_file, "w") as f:
            f.write("".join(test_id + "\n" for test_id in expected.excluded))
        env = dict(os.environ)
        env.update(suite.env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [HERE, env.get("PYTHONPATH")]))
        env["FMM_UPSTREAM_EXCLUDE"] = exclude_file
        env["FMM_UPSTREAM_RESULTS"] = results_file
        # their conftests expect servers to be running when CI is set
        env.pop("CI", None)
        log_path = os.path.join(BUILD, suite.name + ".log")
        print(f"== {suite.name} {suite.version}: {' '.join(suite.command[1:])} (log: {log_path})", flush=True)
        start = time.monotonic()
        with open(log_path, "w") as log:
            proc = subprocess.run(
                suite.command, cwd=os.path.join(tree, suite.cwd), env=env, stdout=log,
                stderr=subprocess.STDOUT, timeout=suite.timeout,
            )
        elapsed = time.monotonic() - start
        if not os.path.exists(results_file):
            with open(log_path) as log:
                tail = log.read()[-3000:]
            return False, f"{suite.name}: the run recorded no results (exit status {proc.returncode}):\n{tail}"
        with open(results_file) as f:
            results = json.load(f)
    return compare(suite, expected, results, proc.returncode, elapsed)


def compare(suite: Suite, expected: Expected, results: dict, returncode: int, elapsed: float) -> tuple[bool, str]:
    tests: dict[str, str] = results["tests"]
    counted = {t: o for t, o in tests.items() if not suite.reached_only or t in set(results["reached"])}
    passed = sorted(t for t, o in counted.items() if o == "passed")
    bad = sorted((t, o) for t, o in counted.items() if o != "passed")
    problems = [f"  {o}: {t}" for t, o in bad]
    problems += [f"  stale exclusion (no such test): {t}" for t in results["unmatched_exclusions"]]
    if len(passed) < expected.min_passed:
        problems.append(f"  {len(passed)} passed, fewer than min_passed {expected.min_passed}")
    if not suite.reached_only and returncode != 0 and not bad:
        problems.append(f"  the test run exited with status {returncode}")
    summary = (
        f"{suite.name} {suite.version}: {len(passed)} of {len(counted)} "
        + ("tests that reach the backend " if suite.reached_only else "")
        + f"passed, {len(expected.excluded)} excluded"
        + (f" ({len(tests) - len(counted)} other tests do not reach it)" if suite.reached_only else "")
        + f", {elapsed:.0f} s"
    )
    if problems:
        return False, summary + "\n" + "\n".join(problems)
    return True, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suites", nargs="*", metavar="SUITE", help=f"{', '.join(SUITES)} (default: all)")
    args = parser.parse_args()
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(unknown)}; the suites are {', '.join(SUITES)}")
    names = args.suites or list(SUITES)
    ok = True
    lines = []
    for name in names:
        good, text = run_suite(SUITES[name])
        print(("ok   " if good else "FAIL ") + text, flush=True)
        lines.append(("ok   " if good else "FAIL ") + text.split("\n")[0])
        ok = ok and good
    print("\n".join(["== test-upstream summary", *lines]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
