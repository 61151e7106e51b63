"""Thread scaling in one process: 1 vs 2 threads on one Cache object.

    PYTHON_GIL=0 .venv-ft/bin/python benchmarks/threads.py [--ops N] [--passes P]

Meant for free-threaded CPython (3.13t, `make test-ft` builds its venv);
under the GIL it runs too and shows the GIL's serialisation.  Two
workloads over 10,000 16-byte keys and 100-byte values in a 64 MiB cache:
"get" (every key present) and "mix" (90% get, 10% set).  Each thread makes
its own keys and its own bound methods, so that the only object the
threads share is the cache (shared objects' reference counts are atomic
under free-threading and would measure the interpreter, not the cache).

Passes are interleaved (1 thread, 2 threads, for each workload, then
again) and the best pass of each cell is kept, so that a noisy neighbour
slows every cell alike rather than one of them.  Prints operations per
second per cell, the 2-thread/1-thread ratio per workload, the load
average before and after, and whether the GIL was enabled.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time

import fastmmap

N_KEYS = 10_000


def worker(c: fastmmap.Cache, workload: str, n: int, seed: int, start: threading.Barrier, out: list[float]) -> None:
    rnd = random.Random(seed)
    keys = [b"k%015d" % rnd.randrange(N_KEYS) for _ in range(20_000)]
    value = rnd.randbytes(100)
    writes = [rnd.random() < 0.1 for _ in range(len(keys))] if workload == "mix" else None
    get, set_ = c.get, c.set
    start.wait()
    t0 = time.perf_counter()
    done = 0
    while done < n:
        if writes is None:
            for k in keys:
                get(k)
        else:
            for k, w in zip(keys, writes):
                if w:
                    set_(k, value)
                else:
                    get(k)
        done += len(keys)
    out.append(time.perf_counter() - t0)


def run_cell(c: fastmmap.Cache, workload: str, threads: int, n: int, seed: int) -> float:
    """Total operations per second of `threads` threads doing n operations each."""
    start = threading.Barrier(threads + 1)
    out: list[float] = []
    ts = [
        threading.Thread(target=worker, args=(c, workload, n, seed + i, start, out)) for i in range(threads)
    ]
    for t in ts:
        t.start()
    t0 = time.perf_counter()
    start.wait()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    ops = threads * (n // 20_000 + (n % 20_000 > 0)) * 20_000
    return ops / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ops", type=int, default=400_000, help="operations per thread per cell")
    ap.add_argument("--passes", type=int, default=5)
    args = ap.parse_args()
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        c = fastmmap.Cache(os.path.join(d, "threads.cache"), init_file=True, cache_size="64m")
        value = random.Random(0).randbytes(100)
        for i in range(N_KEYS):
            c.set(b"k%015d" % i, value)
        best: dict[tuple[str, int], float] = {}
        for p in range(args.passes):
            for workload in ("get", "mix"):
                for threads in (1, 2):
                    r = run_cell(c, workload, threads, args.ops, seed=1000 * p)
                    best[workload, threads] = max(best.get((workload, threads), 0.0), r)
        c.close()
    load1 = os.getloadavg()
    print(f"python {sys.version.split()[0]}, GIL {'enabled' if gil else 'disabled'}, {os.cpu_count()} CPUs, "
          f"best of {args.passes} passes, {args.ops} ops per thread per cell")
    print(f"load average before {load0[0]:.1f}, after {load1[0]:.1f}")
    for workload in ("get", "mix"):
        one, two = best[workload, 1], best[workload, 2]
        print(f"{workload:4s} 1 thread {one / 1e6:6.3f} Mops/s   2 threads {two / 1e6:6.3f} Mops/s   "
              f"ratio {two / one:.2f}x")


if __name__ == "__main__":
    main()
