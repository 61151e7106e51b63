"""Where two-process scaling goes: private caches, one shared cache, and
one shared cache with each process on its own keys.

    .venv/bin/python benchmarks/scaling.py [--seconds 2] [--rounds 2] [--ops get,set,mix]

Each process does random operations on 100-byte values over 10,000 16-byte
keys (run.py's 100 B cell) for a fixed time, 1 process and then 2 started
together.  Operations: get, set, and mix (90% get, 10% set).

- "private": every process fills and uses its own anonymous cache, so
  nothing is shared and the ratio shows what the machine gives two
  processes doing this work.
- "shared": one cache, created before the fork, used by both on the same
  keys (run.py's setting): stores pass the page header's and the entries'
  cache lines between the cores.
- "disjoint": one shared cache, but each process uses its own half of the
  keys: the pages (and their header lines) are shared, the entries are not.
  The gap between it and "private" is what the page lock's line costs; the
  gap between it and "shared" is what the entries' lines cost.
"""

import argparse
import multiprocessing as mp
import os
import random
import time

import fastmmap

NKEYS = 10000
KEYS = [b"k%015d" % i for i in range(NKEYS)]
VALUE = b"x" * 100


def _new_cache():
    c = fastmmap.Cache(anonymous=True, cache_size="64m", page_size="64k")
    for k in KEYS:
        c.set(k, VALUE)
    return c


def _work(shared, mode, op, wid, nprocs, q, barrier, seconds):
    c = shared if shared is not None else _new_cache()
    keys = KEYS[wid::nprocs] if mode == "disjoint" else KEYS
    rng = random.Random(os.getpid())
    ops = [(op == "set" or (op == "mix" and rng.random() < 0.1), k) for k in rng.choices(keys, k=20000)]
    get, set_ = c.get, c.set
    barrier.wait()
    n = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        if op == "get":
            for _, k in ops:
                get(k)
        elif op == "set":
            for _, k in ops:
                set_(k, VALUE)
        else:
            for s, k in ops:
                if s:
                    set_(k, VALUE)
                else:
                    get(k)
        n += len(ops)
    q.put(n / (time.perf_counter() - t0))


def run(nprocs, mode, op, seconds):
    shared = None if mode == "private" else _new_cache()
    q, barrier = mp.Queue(), mp.Barrier(nprocs)
    procs = [mp.Process(target=_work, args=(shared, mode, op, w, nprocs, q, barrier, seconds))
             for w in range(nprocs)]
    for p in procs:
        p.start()
    total = sum(q.get() for _ in procs)
    for p in procs:
        p.join()
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ops", default="get,set,mix")
    args = ap.parse_args()
    mp.set_start_method("fork")
    for _ in range(args.rounds):
        for op in args.ops.split(","):
            for mode in ("private", "shared", "disjoint"):
                one, two = run(1, mode, op, args.seconds), run(2, mode, op, args.seconds)
                print(f"{op:4s} {mode:8s} 1 proc {one / 1e6:.2f}M/s  2 procs {two / 1e6:.2f}M/s  "
                      f"ratio {two / one:.2f}", flush=True)


if __name__ == "__main__":
    main()
