"""A Django test runner that drops the excluded tests and records outcomes.

Named by fmm_django_settings.TEST_RUNNER.  The exclusions come from
FMM_UPSTREAM_EXCLUDE (one test id, "module.Class.method", a line), the
outcomes go to FMM_UPSTREAM_RESULTS as JSON, in the format of
fmm_upstream_plugin.py.
"""

from __future__ import annotations

import json
import os
import unittest

from django.test.runner import DiscoverRunner

_results: dict[str, str] = {}


def _test_id(test: unittest.TestCase) -> str:
    return test.id()


class RecordingResult(unittest.TextTestResult):
    def addSuccess(self, test):  # type: ignore[no-untyped-def]
        super().addSuccess(test)
        _results.setdefault(_test_id(test), "passed")

    def addFailure(self, test, err):  # type: ignore[no-untyped-def]
        super().addFailure(test, err)
        _results[_test_id(test)] = "failed"

    def addError(self, test, err):  # type: ignore[no-untyped-def]
        super().addError(test, err)
        _results[getattr(test, "id", lambda: str(test))()] = "error"

    def addSkip(self, test, reason):  # type: ignore[no-untyped-def]
        super().addSkip(test, reason)
        _results[_test_id(test)] = "skipped"

    def addExpectedFailure(self, test, err):  # type: ignore[no-untyped-def]
        super().addExpectedFailure(test, err)
        _results[_test_id(test)] = "xfailed"

    def addUnexpectedSuccess(self, test):  # type: ignore[no-untyped-def]
        super().addUnexpectedSuccess(test)
        _results[_test_id(test)] = "xpassed"

    def addSubTest(self, test, subtest, err):  # type: ignore[no-untyped-def]
        super().addSubTest(test, subtest, err)
        if err is not None:  # a failed subtest fails its test
            _results[_test_id(test)] = "failed"


def _flatten(suite):  # type: ignore[no-untyped-def]
    for test in suite:
        if isinstance(test, unittest.TestSuite):
            yield from _flatten(test)
        else:
            yield test


class RecordingRunner(DiscoverRunner):
    def get_resultclass(self):  # type: ignore[no-untyped-def]
        return RecordingResult

    def build_suite(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        suite = super().build_suite(*args, **kwargs)
        path = os.environ.get("FMM_UPSTREAM_EXCLUDE")
        excluded = set()
        if path:
            with open(path) as f:
                excluded = {line.strip() for line in f if line.strip()}
        kept = unittest.TestSuite()
        seen = set()
        for test in _flatten(suite):
            if test.id() in excluded:
                seen.add(test.id())
            else:
                kept.addTest(test)
        self._unmatched = sorted(excluded - seen)
        return kept

    def run_tests(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        failures = super().run_tests(*args, **kwargs)
        path = os.environ.get("FMM_UPSTREAM_RESULTS")
        if path:
            with open(path, "w") as f:
                json.dump(
                    {"tests": _results, "reached": sorted(_results), "unmatched_exclusions": self._unmatched},
                    f,
                    indent=1,
                )
        return failures
