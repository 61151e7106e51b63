# fastmmap developer tasks (GNU make).
#
#   make demo    build, install into .venv and run the multi-process demo
#   make test    C engine tests under ASan+UBSan (and the fuzz corpus replayed),
#                the pytest suite, the pytest suite again against an
#                ASan+UBSan build of the extension (test-asan), and the C
#                engine tests under valgrind (ctest-valgrind)
#   make ctest   only the C engine tests and the fuzz corpus replay
#   make test-asan       only the pytest suite against the sanitizer build
#   make ctest-valgrind  only the C engine tests under valgrind
#   make fuzz    libFuzzer (clang) on csrc/fuzz_fmm.c, then csrc/fuzz_fmm_perl.c
#                (the Perl file format), FUZZ_SECONDS each
#   make fuzz-merge      fold new fuzz finds into a minimal tests/fuzz_corpus
#   make stress  the tests marked "stress", then `make fuzz`
#   make bench / bench-smoke   benchmarks/run.py (full / quick)
#   make python-ft   build a free-threaded CPython 3.13 (3.13t) into a cache
#                folder, once (.ci/build-python-ft)
#   make test-ft the pytest suite on 3.13t with the GIL off (.venv-ft)
#   make clean / distclean     remove build outputs / also .venv
#
# The tests import the fastmmap *installed* in .venv, never src/: the src
# layout keeps src/ off sys.path, and nothing here adds it.

PYTHON ?= python3

# The engine: every C file but the binding and the test drivers.
ENGINE_SRC := csrc/fmm.c csrc/fmm_perl.c csrc/fmm_guard.c
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
SETUPTOOLS_BUILD_DIRS := build/setuptools-* build/lib.* build/temp.* build/bdist.* src/*.egg-info

CTEST_CFLAGS := -std=gnu11 -g -O1 -fsanitize=address,undefined \
	-fno-sanitize-recover=all -fno-omit-frame-pointer -Wall -Wextra -Werror
CTEST_ENV := ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

# The fuzz target: libFuzzer needs clang; the corpus replay (in ctest) is
# the same file built with $(CC) and -DFMM_FUZZ_REPLAY.
CLANG ?= clang
FUZZ_SECONDS ?= 300
FUZZ_CORPUS := tests/fuzz_corpus
FUZZ_CORPUS_PERL := tests/fuzz_corpus_perl
FUZZ_CFLAGS := -std=gnu11 -g -O1 -fsanitize=fuzzer,address,undefined \
	-fno-sanitize-recover=all -fno-omit-frame-pointer -Wall -Wextra -Werror
# New finds go to build/fuzz-new (first corpus directory), crashes to
# build/fuzz-artifacts; `make fuzz-merge` folds the finds into FUZZ_CORPUS.
FUZZ_RUN_FLAGS ?= -timeout=10 -print_final_stats=1 -artifact_prefix=build/fuzz-artifacts/

# The extension built with FASTMMAP_SANITIZE=1 into its own venv.  gcc
# links the UBSan runtime into the .so; the ASan runtime must come first
# in the process, hence LD_PRELOAD.  Python's own allocator would hide heap
# errors from ASan (PYTHONMALLOC=malloc), and CPython "leaks" by design
# (detect_leaks=0).  FASTMMAP_ASAN=1 lets tests skip what can't run there.
ASAN_CC ?= gcc
ASAN_VENV := .venv-asan
ASAN_VPY := $(ASAN_VENV)/bin/python
ASAN_ENV = LD_PRELOAD="$$($(ASAN_CC) -print-file-name=libasan.so)" PYTHONMALLOC=malloc \
	ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 FASTMMAP_ASAN=1

# valgrind's leak check runs at every process exit, forked children's too,
# and --error-exitcode turns a child's status to 1.  At -O1 a child that
# _exit()s while its parent's handles live only in registers reports them
# "definitely lost"; at -O0 every local stays on the stack (reachable).
VALGRIND_CFLAGS := -std=gnu11 -g -O0 -Wall -Wextra -Werror
VALGRIND := valgrind --error-exitcode=1 -q --leak-check=full

.PHONY: all venv install install-test demo ctest ctest-valgrind test test-asan stress fuzz \
	fuzz-merge bench-deps bench bench-smoke clean distclean python-ft test-ft

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
	$(CC) $(CTEST_CFLAGS) -Icsrc $(ENGINE_SRC) csrc/test_fmm.c -o build/test_fmm -lpthread
	$(CTEST_ENV) build/test_fmm
	$(CC) $(CTEST_CFLAGS) -Icsrc $(ENGINE_SRC) csrc/test_fmm_perl.c -o build/test_fmm_perl -lpthread
	$(CTEST_ENV) build/test_fmm_perl
	$(CC) $(CTEST_CFLAGS) -DFMM_FUZZ_REPLAY -Icsrc $(ENGINE_SRC) csrc/fuzz_fmm.c \
		-o build/fuzz_replay -lpthread
	$(CTEST_ENV) build/fuzz_replay $(FUZZ_CORPUS)
	$(CC) $(CTEST_CFLAGS) -DFMM_FUZZ_REPLAY -Icsrc $(ENGINE_SRC) csrc/fuzz_fmm_perl.c \
		-o build/fuzz_replay_perl -lpthread
	$(CTEST_ENV) build/fuzz_replay_perl $(FUZZ_CORPUS_PERL)

# The C tests without sanitizers, under memcheck.
ctest-valgrind:
	mkdir -p build
	$(CC) $(VALGRIND_CFLAGS) -Icsrc $(ENGINE_SRC) csrc/test_fmm.c -o build/test_fmm_plain -lpthread
	$(VALGRIND) build/test_fmm_plain
	$(CC) $(VALGRIND_CFLAGS) -Icsrc $(ENGINE_SRC) csrc/test_fmm_perl.c -o build/test_fmm_perl_plain -lpthread
	$(VALGRIND) build/test_fmm_perl_plain

test: install-test
	$(MAKE) --no-print-directory ctest
	$(VPY) -m pytest -q -m "not stress"
	$(MAKE) --no-print-directory test-asan
	$(MAKE) --no-print-directory ctest-valgrind

test-asan:
	@if [ ! -x $(ASAN_VPY) ]; then echo "creating $(ASAN_VENV)"; $(PYTHON) -m venv $(ASAN_VENV); fi
	$(ASAN_VPY) -m pip install -q --upgrade pip
	rm -rf $(SETUPTOOLS_BUILD_DIRS)
	CC=$(ASAN_CC) FASTMMAP_SANITIZE=1 $(ASAN_VPY) -m pip install -q '.[test]'
	rm -rf $(SETUPTOOLS_BUILD_DIRS)
	@# One pytest process per file: a thread left running by one file's
	@# tests (e.g. asgiref's executor) must not be alive when another file
	@# forks, because a fork under ASan can deadlock on its internal locks.
	rc=0; for f in tests/test_*.py; do \
		echo "test-asan: $$f"; \
		$(ASAN_ENV) $(ASAN_VPY) -m pytest -q -p no:cacheprovider -m "not stress" "$$f" || \
			{ s=$$?; if [ $$s -ne 5 ]; then rc=1; fi; }; \
	done; exit $$rc

# Free-threaded CPython: the suite in its own venv, with PYTHON_GIL=0 so
# that a test dependency without free-threading support cannot turn the GIL
# back on; fastmmap itself must not (checked after import, and with
# PYTHON_GIL unset by tests/test_freethreading.py).  FASTMMAP_FT_ROUNDS
# lengthens that file's thread races; they run here, not in every version.
FT_VENV := .venv-ft
FT_VPY := $(FT_VENV)/bin/python
FT_ROUNDS ?= 4

python-ft:
	.ci/build-python-ft

test-ft:
	@if [ ! -x $(FT_VPY) ]; then py=$$(.ci/build-python-ft); echo "creating $(FT_VENV) from $$py"; \
		"$$py" -m venv $(FT_VENV); fi
	$(FT_VPY) -m pip install -q --upgrade pip
	rm -rf $(SETUPTOOLS_BUILD_DIRS)
	@# hypothesis' newer releases and mypy's ast-serialize have a Rust part
	@# with no free-threaded wheel, whose sdist fetches crates from the
	@# network: take the newest releases that ship wheels instead.
	$(FT_VPY) -m pip install -q --only-binary=hypothesis,ast-serialize '.[test]'
	rm -rf $(SETUPTOOLS_BUILD_DIRS)
	PYTHON_GIL=0 $(FT_VPY) -c 'import sys, fastmmap; assert not sys._is_gil_enabled(), "GIL on after import"'
	PYTHON_GIL=0 FASTMMAP_FT_ROUNDS=$(FT_ROUNDS) $(FT_VPY) -m pytest -q -p no:cacheprovider -m "not stress"

fuzz:
	mkdir -p build/fuzz-new build/fuzz-artifacts
	$(CLANG) $(FUZZ_CFLAGS) -Icsrc $(ENGINE_SRC) csrc/fuzz_fmm.c -o build/fuzz_fmm -lpthread
	build/fuzz_fmm $(FUZZ_RUN_FLAGS) -max_total_time=$(FUZZ_SECONDS) build/fuzz-new $(FUZZ_CORPUS)
	mkdir -p build/fuzz-perl-new
	$(CLANG) $(FUZZ_CFLAGS) -Icsrc $(ENGINE_SRC) csrc/fuzz_fmm_perl.c -o build/fuzz_fmm_perl -lpthread
	build/fuzz_fmm_perl $(FUZZ_RUN_FLAGS) -max_total_time=$(FUZZ_SECONDS) build/fuzz-perl-new $(FUZZ_CORPUS_PERL)

# Minimise FUZZ_CORPUS plus build/fuzz-new into FUZZ_CORPUS: the smallest
# inputs that keep every covered edge (-use_counters=0: edges, not hit
# counts, which would keep ~7x more files).  Bug reproducers (repro-*) are
# kept whether or not they add coverage.
fuzz-merge:
	mkdir -p build/fuzz-new
	$(CLANG) $(FUZZ_CFLAGS) -Icsrc $(ENGINE_SRC) csrc/fuzz_fmm.c -o build/fuzz_fmm -lpthread
	rm -rf build/fuzz-merged && mkdir -p build/fuzz-merged
	build/fuzz_fmm -merge=1 -use_counters=0 build/fuzz-merged $(FUZZ_CORPUS) build/fuzz-new
	cp $(FUZZ_CORPUS)/repro-* build/fuzz-merged/ 2>/dev/null || true
	rm -rf $(FUZZ_CORPUS) && mv build/fuzz-merged $(FUZZ_CORPUS)
	mkdir -p build/fuzz-perl-new
	$(CLANG) $(FUZZ_CFLAGS) -Icsrc $(ENGINE_SRC) csrc/fuzz_fmm_perl.c -o build/fuzz_fmm_perl -lpthread
	rm -rf build/fuzz-merged-perl && mkdir -p build/fuzz-merged-perl
	build/fuzz_fmm_perl -merge=1 -use_counters=0 build/fuzz-merged-perl $(FUZZ_CORPUS_PERL) build/fuzz-perl-new
	rm -rf $(FUZZ_CORPUS_PERL) && mv build/fuzz-merged-perl $(FUZZ_CORPUS_PERL)
	echo "$(FUZZ_CORPUS): $$(ls $(FUZZ_CORPUS) | wc -l) files, $$(du -sh $(FUZZ_CORPUS) | cut -f1)"

# pytest exits 5 when it collects no test: not a failure for a placeholder.
stress: install-test
	rc=0; $(VPY) -m pytest -q -m stress || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "stress: no stress tests collected"; rc=0; fi; \
	exit $$rc
	$(MAKE) --no-print-directory fuzz

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
	find . \( -path ./$(VENV) -o -path ./$(ASAN_VENV) -o -path ./$(FT_VENV) \) -prune -o -name __pycache__ -type d -prune \
		-exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(ASAN_VENV) $(FT_VENV)
