"""Settings for Django's runtests.py: Django's own test_sqlite plus a test
runner that records each test's outcome (tests/upstream/run.py)."""

from test_sqlite import *  # noqa: F401,F403  (Django's tests/ is on sys.path)

TEST_RUNNER = "fmm_django_runner.RecordingRunner"
