# fastmmap developer tasks (GNU make).
#
#   make demo    build, install into .venv and run the multi-process demo
#   make test    C engine tests under ASan+UBSan, then the pytest suite
#   make ctest   only the C engine tests
#   make stress  only the tests marked "stress"
#   make bench / bench-smoke   benchmarks/run.py (full / quick)
#   make clean / distclean     remove build outputs / also .venv
#
# The tests import the fastmmap *installed* in .venv, never src/: the src
# layout keeps src/ off sys.path, and nothing here adds it.

PYTHON ?= python3
CC ?= cc

VENV := .venv
VPY := $(VENV)/bin/python
VPIP := $(VPY) -m pip

# Every recipe runs in bash with -e and pipefail: any failing step fails
# the target.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DELETE_ON_ERROR:

# pip rebuilds and reinstalls a local directory on every `pip install .`, but
# setuptools reuses object files in build/ when the sources are older, even
# if FASTMMAP_* flags changed: drop them so that each install rebuilds.
SETUPTOOLS_BUILD_DIRS := build/lib.* build/temp.* build/bdist.* src/*.egg-info

CTEST_CFLAGS := -std=gnu11 -g -O1 -fsanitize=address,undefined \
	-fno-sanitize-recover=all -fno-omit-frame-pointer -Wall -Wextra -Werror
CTEST_ENV := ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

.PHONY: all venv install install-test demo ctest test stress bench-deps bench bench-smoke \
	clean distclean

all: test

venv:
	@if [ ! -x $(VPY) ]; then echo "creating $(VENV)"; $(PYTHON) -m venv $(VENV); fi
	$(VPIP) install -q --upgrade pip

install: venv
	rm -rf $(SETUPTOOLS_BUILD_DIRS)
	$(VPIP) install -q .

install-test: venv
	rm -rf $(SETUPTOOLS_BUILD_DIRS)
	$(VPIP) install -q '.[test]'

demo: install
	$(VPY) -m fastmmap demo

ctest:
	mkdir -p build
	$(CC) $(CTEST_CFLAGS) -Icsrc csrc/fmm.c csrc/test_fmm.c -o build/test_fmm -lpthread
	$(CTEST_ENV) build/test_fmm

test: install-test
	$(MAKE) --no-print-directory ctest
	$(VPY) -m pytest -q -m "not stress"

# pytest exits 5 when it collects no test: not a failure for a placeholder.
stress: install-test
	rc=0; $(VPY) -m pytest -q -m stress || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "stress: no stress tests collected"; rc=0; fi; \
	exit $$rc

# The benchmarks' Python peers (diskcache, lmdb, redis, ...) and charting.
bench-deps: install
	if [ -f benchmarks/requirements.txt ]; then \
		$(VPIP) install -q -r benchmarks/requirements.txt; fi

bench: bench-deps
	$(VPY) benchmarks/run.py

bench-smoke: bench-deps
	$(VPY) benchmarks/run.py --smoke

clean:
	rm -rf build dist src/*.egg-info *.egg-info .pytest_cache .hypothesis .benchmarks
	rm -f src/fastmmap/*.so
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
