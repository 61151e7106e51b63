# fastmmap developer tasks (GNU make).
#
#   make demo    build, install into .venv and run the multi-process demo
#   make test    C engine tests under ASan+UBSan (and the fuzz corpus replayed),
#                the pytest suite, the pytest suite again against an
#                ASan+UBSan build of the extension (test-asan), and the C
#                engine tests under valgrind (ctest-valgrind); first it
#                installs (as root, with apt-get) or lists the Debian
#                packages that these need (.ci/APT_PACKAGES)
#   make ctest   only the C engine tests and the fuzz corpus replay
#   make test-asan       only the pytest suite against the sanitizer build
#   make ctest-valgrind  only the C engine tests under valgrind
#   make test-upstream   Django's, cachelib's, Flask-Caching's and
#                dogpile.cache's own test suites (sdists from PyPI, pinned in
#                tests/upstream/) against fastmmap's backends, compared with
#                tests/upstream/expected/
#   make fuzz    libFuzzer (clang) on csrc/fuzz_fmm.c, then csrc/fuzz_fmm_perl.c
#                (the Perl file format), FUZZ_SECONDS each
#   make fuzz-merge      fold new fuzz finds into a minimal tests/fuzz_corpus
#   make stress  the tests marked "stress", then `make fuzz`
#   make flake-hunt      the pytest suite FLAKE_RUNS times while FLAKE_LOAD
#                busy loops load the cores; reports every test that failed
#                even once (.ci/flake_hunt.py, output in build/flake-hunt)
#   make bench / bench-smoke   benchmarks/run.py (full / quick)
#   make test-matrix     the pytest suite (not stress, not slow) on the other
#                        CPython versions, a venv each (.venv-3.12, ...)
#   make wheels  manylinux_2_28 x86_64/aarch64 and musllinux_1_2 x86_64 wheels
#                with zig cc (tools/build_wheels.py) into wheelhouse/, checked
#                with auditwheel, then ctest-cross and wheel-test
#   make ctest-cross     the C engine tests built with zig cc for each wheel
#                        target (aarch64 run under qemu-user, musl static)
#   make wheel-test      the pytest suite against the x86_64 wheel in a fresh
#                        venv, with every C compiler off PATH
#   make sdist-check     build the sdist, check-manifest, twine check --strict,
#                        then `make ctest` from the unpacked sdist
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

# -Wpedantic: gcc accepts GNU extensions that clang (make fuzz) rejects as
# errors, such as a declaration right after a label; CI builds with gcc only.
CTEST_CFLAGS := -std=gnu11 -g -O1 -fsanitize=address,undefined \
	-fno-sanitize-recover=all -fno-omit-frame-pointer -Wall -Wextra -Wpedantic -Werror
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
VALGRIND_CFLAGS := -std=gnu11 -g -O0 -Wall -Wextra -Wpedantic -Werror
VALGRIND := valgrind --error-exitcode=1 -q --leak-check=full

.PHONY: all venv install install-test demo ctest ctest-valgrind test test-asan test-upstream stress fuzz \
	fuzz-merge flake-hunt bench-deps bench bench-smoke clean distclean test-matrix dist-tools wheels \
	ctest-cross wheel-test sdist-check python-ft test-ft

all: test

# What the system must provide (.ci/APT_PACKAGES, by group): checked before
# anything is built, installed with apt-get when run as root, else listed.
# The targets that need more than the build add their group; a target's
# variables reach its prerequisites, so `make test` checks them in venv.
CHECK_DEPS := PYTHON=$(PYTHON) .ci/check-deps
DEPS_GROUPS := build
test: DEPS_GROUPS += test
stress: DEPS_GROUPS += test fuzz

venv:
	$(CHECK_DEPS) $(DEPS_GROUPS)
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

# Other projects' suites, in a venv of their own: they need the pinned
# versions of Django & co., which the [test] extra leaves unpinned.
UPSTREAM_VENV := .venv-upstream
UPSTREAM_VPY := $(UPSTREAM_VENV)/bin/python

test-upstream:
	@if [ ! -x $(UPSTREAM_VPY) ]; then echo "creating $(UPSTREAM_VENV)"; $(PYTHON) -m venv $(UPSTREAM_VENV); fi
	$(UPSTREAM_VPY) -m pip install -q --upgrade pip
	rm -rf $(SETUPTOOLS_BUILD_DIRS)
	$(UPSTREAM_VPY) -m pip install -q . -r tests/upstream/requirements.txt
	rm -rf $(SETUPTOOLS_BUILD_DIRS)
	$(UPSTREAM_VPY) tests/upstream/run.py

# Free-threaded CPython: the suite in its own venv, with PYTHON_GIL=0 so
# that a test dependency without free-threading support cannot turn the GIL
# back on; fastmmap itself must not (checked after import, and with
# PYTHON_GIL unset by tests/test_freethreading.py).  FASTMMAP_FT_ROUNDS
# lengthens that file's thread races; they run here, not in every version.
FT_VENV := .venv-ft
FT_VPY := $(FT_VENV)/bin/python
FT_ROUNDS ?= 4

python-ft:
	$(CHECK_DEPS) ft
	.ci/build-python-ft

test-ft:
	$(CHECK_DEPS) ft
	@if [ ! -x $(FT_VPY) ]; then py=$$(.ci/build-python-ft); echo "creating $(FT_VENV) from $$py"; \
		"$$py" -m venv $(FT_VENV); fi
	$(FT_VPY) -m pip install -q --upgrade pip
	rm -rf $(SETUPTOOLS_BUILD_DIRS)
	@# hypothesis' newer releases, mypy's ast-serialize and pydantic-core
	@# (for fastapi) have a Rust part with no free-threaded wheel, whose
	@# sdist fetches crates from the network: take the newest releases that
	@# ship wheels instead.
	$(FT_VPY) -m pip install -q --only-binary=hypothesis,ast-serialize,pydantic-core '.[test]'
	rm -rf $(SETUPTOOLS_BUILD_DIRS)
	PYTHON_GIL=0 $(FT_VPY) -c 'import sys, fastmmap; assert not sys._is_gil_enabled(), "GIL on after import"'
	PYTHON_GIL=0 FASTMMAP_FT_ROUNDS=$(FT_ROUNDS) $(FT_VPY) -m pytest -q -p no:cacheprovider -m "not stress"

fuzz:
	$(CHECK_DEPS) fuzz
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

# A test that passes idle but fails when its processes are scheduled late
# (a sleep used to wait for another process, a timing assertion) fails
# here; one failure in any run is a flaky test to fix.
FLAKE_RUNS ?= 10
FLAKE_LOAD ?= 2
flake-hunt: install-test
	$(VPY) .ci/flake_hunt.py --runs $(FLAKE_RUNS) --load $(FLAKE_LOAD)

# The benchmarks' Python peers (diskcache, lmdb, redis, ...) and charting.
bench-deps: install
	if [ -f benchmarks/requirements.txt ]; then \
		$(VPIP) install -q -r benchmarks/requirements.txt; fi

bench: bench-deps
	$(VPY) benchmarks/run.py

bench-smoke: bench-deps
	$(VPY) benchmarks/run.py --smoke

# The suite on the CPython versions besides $(PYTHON), one venv each; the
# slow tests (kill storm, guard, long races) run on $(PYTHON) only, in
# `make test`.  tools/find-python says which interpreter is missing.
# MATRIX_PYTHONS takes free-threaded builds too (3.13t) once the binding
# supports them.
MATRIX_PYTHONS ?= 3.12 3.13
test-matrix:
	for v in $(MATRIX_PYTHONS); do \
		py="$$(tools/find-python $$v)"; venv=".venv-$$v"; \
		echo "test-matrix: $$v ($$py)"; \
		if [ ! -x "$$venv/bin/python" ]; then "$$py" -m venv "$$venv"; fi; \
		"$$venv/bin/python" -m pip install -q --upgrade pip; \
		rm -rf $(SETUPTOOLS_BUILD_DIRS); \
		"$$venv/bin/python" -m pip install -q '.[test]'; \
		"$$venv/bin/python" -m pytest -q -p no:cacheprovider -m "not stress and not slow"; \
	done

# ---- Release wheels (tools/build_wheels.py says why zig cc) ----
DIST_VENV := .venv-dist
DIST_PY := $(DIST_VENV)/bin/python
ZIG := $(DIST_PY) -m ziglang
WHEEL_PYTHONS ?= 3.11 3.12 3.13
WHEELHOUSE ?= wheelhouse
CROSS_TARGETS := x86_64-linux-gnu.2.28 aarch64-linux-gnu.2.28 x86_64-linux-musl
CROSS_CFLAGS := -std=gnu11 -g -O1 -Wall -Wextra -Werror
# Debian's qemu-user and libc6-arm64-cross (the aarch64 glibc to run on).
QEMU_AARCH64 ?= qemu-aarch64 -L /usr/aarch64-linux-gnu

dist-tools:
	@if [ ! -x $(DIST_PY) ]; then echo "creating $(DIST_VENV)"; $(PYTHON) -m venv $(DIST_VENV); fi
	$(DIST_PY) -m pip install -q --upgrade pip
	$(DIST_PY) -m pip install -q -r tools/dist-requirements.txt

wheels: dist-tools
	rm -rf $(WHEELHOUSE)
	args=(); for v in $(WHEEL_PYTHONS); do args+=(--python "$$v=$$(tools/find-python $$v)"); done; \
	$(DIST_PY) tools/build_wheels.py --werror --out $(WHEELHOUSE) "$${args[@]}"
	@# auditwheel must name the tag the file carries, nothing older.
	for w in $(WHEELHOUSE)/*.whl; do \
		tag="$$(basename "$$w" .whl)"; tag="$${tag##*-}"; \
		out="$$($(DIST_VENV)/bin/auditwheel show "$$w" 2>&1 | tr '\n' ' ')"; \
		echo "$$out" | grep -q "consistent with the following platform tag: \"$$tag\"" || \
			{ echo "wheels: auditwheel does not accept $$w as $$tag: $$out" >&2; exit 1; }; \
		echo "wheels: $$(basename "$$w"): auditwheel: $$tag"; \
	done
	$(MAKE) --no-print-directory ctest-cross
	$(MAKE) --no-print-directory wheel-test

ctest-cross: dist-tools
	$(CHECK_DEPS) wheels
	mkdir -p build/cross
	for t in $(CROSS_TARGETS); do \
		case "$$t" in \
			*musl) link=-static; run=() ;; \
			aarch64*) link=; run=($(QEMU_AARCH64)) ;; \
			*) link=; run=() ;; \
		esac; \
		for d in test_fmm test_fmm_perl; do \
			echo "ctest-cross: $$d on $$t"; \
			$(ZIG) cc -target "$$t" $$link $(CROSS_CFLAGS) -Icsrc $(ENGINE_SRC) csrc/$$d.c \
				-o "build/cross/$$d-$$t" -lpthread; \
			"$${run[@]}" "build/cross/$$d-$$t" | tail -n 1; \
		done; \
	done

# The wheel for $(PYTHON) in a fresh venv: fastmmap installed from it with
# no compiler reachable (build/no-cc shadows every C compiler name with a
# script that fails), the test dependencies installed normally (uwsgi is
# built from source), then the suite run with the compilers still shadowed.
WHEEL_TEST_VENV := build/wheel-test-venv
NO_CC := cc gcc g++ c++ clang clang-14 x86_64-linux-gnu-gcc x86_64-linux-gnu-gcc-12 zig
wheel-test:
	rm -rf $(WHEEL_TEST_VENV) build/no-cc
	mkdir -p build/no-cc
	for c in $(NO_CC); do \
		printf '#!/bin/sh\necho "%s: no C compiler in wheel-test" >&2\nexit 127\n' "$$c" > build/no-cc/$$c; \
		chmod +x build/no-cc/$$c; \
	done
	$(PYTHON) -m venv $(WHEEL_TEST_VENV)
	nodot="$$($(PYTHON) -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"; \
	whl="$$(ls $(WHEELHOUSE)/fastmmap-*-cp$$nodot-cp$$nodot-manylinux_2_28_x86_64.whl)"; \
	PATH="$$PWD/build/no-cc:$$PATH" $(WHEEL_TEST_VENV)/bin/pip install -q --no-index --no-deps "$$whl"; \
	$(WHEEL_TEST_VENV)/bin/pip install -q "$$whl[test]"; \
	PATH="$$PWD/build/no-cc:$$PATH" $(WHEEL_TEST_VENV)/bin/python -c \
		'import subprocess, fastmmap._fastmmap as m; assert subprocess.run(["cc"], capture_output=True).returncode == 127; print("wheel-test:", m.__file__)'; \
	PATH="$$PWD/build/no-cc:$$PATH" $(WHEEL_TEST_VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not stress"

# The sdist alone: every file in git is in it (or excluded in
# pyproject.toml's [tool.check-manifest] with the reason), its metadata
# passes twine's strict check, and the C tests run from the unpacked tree.
sdist-check: dist-tools
	rm -rf build/sdist && mkdir -p build/sdist
	$(DIST_VENV)/bin/check-manifest
	$(DIST_PY) -m build --sdist --outdir build/sdist .
	$(DIST_VENV)/bin/twine check --strict build/sdist/*.tar.gz
	tar -xzf build/sdist/*.tar.gz -C build/sdist
	$(MAKE) -C build/sdist/fastmmap-*/ --no-print-directory ctest

clean:
	rm -rf build dist src/*.egg-info *.egg-info .pytest_cache .hypothesis .benchmarks
	rm -f src/fastmmap/*.so
	find . \( -path ./$(VENV) -o -path ./$(ASAN_VENV) -o -path ./$(FT_VENV) \) -prune -o -name __pycache__ -type d -prune \
		-exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(ASAN_VENV) $(UPSTREAM_VENV) $(DIST_VENV) .venv-3.* $(WHEELHOUSE) $(FT_VENV)
