"""Threads of one process on one Cache object, racing every kind of call.

Under free-threaded CPython (3.13t, run with PYTHON_GIL=0 by `make test-ft`)
these threads run the binding in parallel; under the GIL they interleave at
its release points.  The module must keep the GIL off when imported, and a
close() racing other threads' calls must neither free the handle under them
nor leave it open once they are done.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import sysconfig
import threading

import pytest

from fastmmap import _fastmmap as _C
from fastmmap import _options
from _helpers import run_threads

pytestmark = pytest.mark.timeout(240)

FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
N_THREADS = 8
# FASTMMAP_FT_ROUNDS scales the loops for a longer run (ThreadSanitizer, or
# hunting a rare interleaving); the default keeps the test short.
ROUNDS = int(os.environ.get("FASTMMAP_FT_ROUNDS", "1"))


def mapped(ino: int) -> bool:
    """True if this process maps the file of inode ino (by inode: the
    mapping may name the temporary file the cache was created as)."""
    with open("/proc/self/maps") as f:
        return any(len(fields) > 5 and fields[4] == str(ino) for fields in (line.split() for line in f))


@pytest.mark.skipif(not FREE_THREADED, reason="needs a free-threaded CPython (make test-ft)")
def test_import_keeps_the_gil_disabled():
    # Without PYTHON_GIL in the environment, importing an extension that
    # does not declare Py_mod_gil turns the GIL back on (with a
    # RuntimeWarning, made an error here).
    env = {k: v for k, v in os.environ.items() if k != "PYTHON_GIL"}
    code = "import sys, fastmmap; print(sys._is_gil_enabled())"
    out = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_threads_mixed_operations_stay_consistent(cache):
    """get/set/del/in, lock-block increments, multi_get/multi_set and
    get_and_set from 8 threads: every read is a value some thread wrote
    for that key, and the counters add up exactly."""
    c = cache(num_pages=5, page_size=8192, lock_timeout=60)
    n = 300 * ROUNDS
    keys = [f"k{i}" for i in range(24)]

    def work(t: int) -> None:
        for i in range(n):
            k = keys[(t * 7 + i) % len(keys)]
            op = (t + i) % 6
            if op == 0:
                c.set(k, f"{k}:{t}:{i}")
            elif op == 1:
                v = c.get(k)
                assert v is None or v.startswith(k + ":"), (k, v)
            elif op == 2:
                with c.lock("ctr-lock") as e:
                    e.value = (e.value or 0) + 1
            elif op == 3:
                batch = {f"{k}.{j}": [t, i, j] for j in range(3)}
                c.multi_set("pk", batch)
                got = c.multi_get("pk", list(batch))
                for bk, bv in got.items():
                    assert bv[2] == int(bk.rsplit(".", 1)[1]), (bk, bv)
            elif op == 4:
                c.get_and_set("ctr-gas", lambda _k, old: (old or 0) + 1)
            else:
                c.set(k, {"k": k, "t": t})  # through pickle
                v = c.get(k)
                assert v is None or (v["k"] if isinstance(v, dict) else v.split(":")[0]) == k, (k, v)
                if k in c:
                    c.remove(k)

    run_threads(work, N_THREADS, timeout=200)
    per_thread = [sum(1 for i in range(n) if (t + i) % 6 == 2) for t in range(N_THREADS)]
    assert c["ctr-lock"] == sum(per_thread)
    per_thread = [sum(1 for i in range(n) if (t + i) % 6 == 4) for t in range(N_THREADS)]
    assert c["ctr-gas"] == sum(per_thread)


def test_close_racing_calls_frees_the_handle_once(cache):
    """close() while 7 threads hammer the cache: calls made before it work,
    calls after it raise ValueError, nothing crashes, and once every thread
    is done the file is unmapped (an in-flight count that lost an update
    would keep it mapped forever, or free it under a running call)."""
    for rnd in range(3 * ROUNDS):
        c = cache(num_pages=3, page_size=4096, lock_timeout=60)
        ino = os.stat(c.share_file).st_ino
        assert mapped(ino)
        workers = N_THREADS - 1
        warmed = [threading.Event() for _ in range(workers)]
        closed_seen = [0] * workers

        def work(t: int) -> None:
            if t == workers:
                # the closer: once every worker is busy, close under them
                for ev in warmed:
                    assert ev.wait(120)
                c.close()
                return
            i = 0
            while True:
                i += 1
                if i == 200:
                    warmed[t].set()
                k = f"k{(t + i) % 11}"
                try:
                    m = i % 5
                    if m == 0:
                        c[k] = b"v" * (i % 50)
                    elif m == 1:
                        c.get(k)
                    elif m == 2:
                        with c.lock(k) as e:
                            e.value = i
                    elif m == 3:
                        c.multi_set("pk", {k: i, k + "x": i})
                        c.multi_get("pk", [k, k + "x"])
                    else:
                        _ = k in c
                except ValueError as e:
                    assert "closed" in str(e), e
                    closed_seen[t] += 1
                    if closed_seen[t] >= 3:
                        return

        run_threads(work, N_THREADS, timeout=200)
        assert c.closed
        assert all(s == 3 for s in closed_seen)
        assert not mapped(ino), f"round {rnd}: the cache file is still mapped after close()"
        with pytest.raises(ValueError, match="closed"):
            c.get("k1")


def test_reconfiguring_while_other_threads_call_the_callbacks(cache):
    """_set_callbacks/_configure swap the callbacks and serializer that other
    threads are calling at that moment: the replaced objects must stay
    alive until those calls return."""
    c = cache(num_pages=3, lock_timeout=60, serializer=(pickle.dumps, pickle.loads))
    stop = threading.Event()
    n = 400 * ROUNDS

    def make_read_cb():
        marker = object()  # a fresh closure each time: dropped when replaced

        def read_cb(_cache, key):
            assert marker is not None
            return "r:" + key

        return read_cb

    def make_serializer():
        marker = object()

        def dumps(v):
            assert marker is not None
            return pickle.dumps(v)

        def loads(b):
            assert marker is not None
            return pickle.loads(b)

        return dumps, loads

    def work(t: int) -> None:
        if t == 0:
            for _ in range(n):
                c._set_callbacks(c, make_read_cb(), None, None, False, False, False)
                dumps, loads = make_serializer()
                c._configure(0, 60.0, _C.T_CUSTOM, dumps, loads, _C.C_NONE, None, None, 0,
                             _options.parse_expire_time, None)
            stop.set()
            return
        i = 0
        while not stop.is_set():
            i += 1
            k = f"miss{t}.{i}"
            assert c.get(k) in ("r:" + k, None)
            c.remove(k)
            c.set(f"d{t}", {"t": t})
            v = c.get(f"d{t}")
            assert v is None or v == {"t": t}

    run_threads(work, N_THREADS, timeout=200)
