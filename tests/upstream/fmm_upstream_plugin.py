"""pytest plugin loaded into another project's test run by tests/upstream/run.py.

- Deselects the tests that the expected-outcomes file excludes (given by
  FMM_UPSTREAM_EXCLUDE, one node id prefix a line) and records the ones
  that match nothing, so that a stale exclusion is reported.
- Records each test's outcome in FMM_UPSTREAM_RESULTS (JSON), and whether
  the test built a fastmmap backend ("reached" it).
- With FMM_UPSTREAM_FLASK_APP=1, points Flask-Caching's ``app`` fixture
  (its tests' Flask app, configured with CACHE_TYPE = "SimpleCache") at
  fastmmap's backend instead, in a file of its own per test; and makes its
  ``clock`` fixture's ``advance(seconds)`` (a fake clock that cachelib's
  SimpleCache reads) move the expiry times of the entries in the test's
  fastmmap backends that many seconds earlier: fastmmap's engine reads the
  real clock, and this is the same as the clock moving on for them.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import pytest

_results: dict[str, str] = {}
_reached: set[str] = set()
_unmatched: list[str] = []
_constructed = 0  # fastmmap backends built so far in this run
_at_setup: dict[str, int] = {}
_backends: list = []  # the test's fastmmap backends (cachelib ones), for the clock


def _count_constructions() -> None:
    """Count every fastmmap backend built, whichever way the test builds it."""
    import fastmmap.contrib.cachelib as fc

    original = fc.FastMmapCache.__init__

    def counting_init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        global _constructed
        _constructed += 1
        original(self, *args, **kwargs)
        _backends.append(self)

    fc.FastMmapCache.__init__ = counting_init  # type: ignore[method-assign]
    try:
        import fastmmap.contrib.dogpile as fd
    except ImportError:
        return
    original_dp = fd.FastMmapBackend.__init__

    def counting_dp_init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        global _constructed
        _constructed += 1
        original_dp(self, *args, **kwargs)

    fd.FastMmapBackend.__init__ = counting_dp_init  # type: ignore[method-assign]


def pytest_configure(config: pytest.Config) -> None:
    _count_constructions()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    path = os.environ.get("FMM_UPSTREAM_EXCLUDE")
    prefixes = []
    if path:
        with open(path) as f:
            prefixes = [line.strip() for line in f if line.strip()]
    used = set()
    kept, deselected = [], []
    for item in items:
        hit = next((p for p in prefixes if item.nodeid == p or item.nodeid.startswith(p + "[")), None)
        if hit is None:
            kept.append(item)
        else:
            used.add(hit)
            deselected.append(item)
    _unmatched.extend(p for p in prefixes if p not in used)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


def pytest_runtest_setup(item: pytest.Item) -> None:
    _at_setup[item.nodeid] = _constructed
    _backends.clear()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    nodeid = report.nodeid
    if report.when == "setup":
        if report.failed:
            _results[nodeid] = "error"
        elif report.skipped:
            _results[nodeid] = "skipped"
    elif report.when == "call":
        if getattr(report, "wasxfail", None) is not None:
            _results[nodeid] = "xfailed" if report.skipped else "xpassed"
        else:
            _results[nodeid] = report.outcome  # passed / failed / skipped
    elif report.when == "teardown":
        if _constructed > _at_setup.get(nodeid, _constructed):
            _reached.add(nodeid)
        if report.failed and _results.get(nodeid) == "passed":
            _results[nodeid] = "error"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get("FMM_UPSTREAM_RESULTS")
    if not path:
        return
    with open(path, "w") as f:
        json.dump({"tests": _results, "reached": sorted(_reached), "unmatched_exclusions": _unmatched}, f, indent=1)


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    outcome = yield
    if os.environ.get("FMM_UPSTREAM_FLASK_APP") != "1" or fixturedef.argname not in ("app", "clock"):
        return
    try:
        value = outcome.get_result()
    except BaseException:
        return
    if fixturedef.argname == "clock":
        real = _ShiftingClock(value)
        # what the test receives is the fixture's cached value
        fixturedef.cached_result = (real,) + tuple(fixturedef.cached_result[1:])  # type: ignore[index]
        outcome.force_result(real)
        return
    app = value
    config = getattr(app, "config", None)
    if config is None or config.get("CACHE_TYPE") != "SimpleCache":
        return
    # A directory per test: each test starts with an empty cache, as with
    # the SimpleCache it replaces.
    cache_dir = tempfile.mkdtemp(prefix="fmm-upstream-")
    request.addfinalizer(lambda: _remove(cache_dir))
    config["CACHE_TYPE"] = "fastmmap.contrib.flask.FastMmapCache"
    config["CACHE_DIR"] = cache_dir


class _ShiftingClock:
    """Flask-Caching's fake clock, whose advance() also ages fastmmap's entries."""

    def __init__(self, fake):  # type: ignore[no-untyped-def]
        self._fake = fake

    def __call__(self):  # type: ignore[no-untyped-def]
        return self._fake()

    @property
    def now(self):  # type: ignore[no-untyped-def]
        return self._fake.now

    def advance(self, seconds):  # type: ignore[no-untyped-def]
        self._fake.advance(seconds)
        now = time.time()
        for backend in _backends:
            fmm = backend._fmm
            if fmm is None or fmm.closed:
                continue
            for entry in fmm.get_keys(2):
                if not entry["expire_on"]:
                    continue  # never expires
                expire_on = entry["expire_on"] - seconds
                if expire_on <= now:
                    fmm.remove(entry["key"])
                else:
                    fmm.set(entry["key"], entry["value"], expire_on=expire_on)


def _remove(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
