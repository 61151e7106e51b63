"""Where two-process scaling goes: private caches versus one shared cache.

    .venv/bin/python benchmarks/scaling.py [--seconds 2] [--rounds 2]

Each process does random gets of 100-byte values over 10,000 16-byte keys
(run.py's 100 B cell) for a fixed time, 1 process and then 2 started
together.  "private": every process fills and reads its own anonymous cache,
so nothing is shared and the ratio shows what the machine gives two
processes doing this work.  "shared": one cache, created before the fork,
read by both: the difference is the cost of sharing (the page lock's cache
line and the entries' LRU stamps moving between the cores).
"""

import argparse
import multiprocessing as mp
import os
import random
import time

import fastmmap

NKEYS = 10000


def _fill(c):
    for i in range(NKEYS):
        c.set(b"k%015d" % i, b"x" * 100)


def _work(shared, q, barrier, seconds):
    c = shared
    if c is None:
        c = fastmmap.Cache(anonymous=True, cache_size="64m", page_size="64k")
        _fill(c)
    keys = [b"k%015d" % i for i in range(NKEYS)]
    ks = random.Random(os.getpid()).choices(keys, k=20000)
    get = c.get
    barrier.wait()
    n = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        for k in ks:
            get(k)
        n += len(ks)
    q.put(n / (time.perf_counter() - t0))


def run(nprocs, mode, seconds):
    shared = None
    if mode == "shared":
        shared = fastmmap.Cache(anonymous=True, cache_size="64m", page_size="64k")
        _fill(shared)
    q, barrier = mp.Queue(), mp.Barrier(nprocs)
    procs = [mp.Process(target=_work, args=(shared, q, barrier, seconds)) for _ in range(nprocs)]
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
    args = ap.parse_args()
    mp.set_start_method("fork")
    for _ in range(args.rounds):
        for mode in ("private", "shared"):
            one, two = run(1, mode, args.seconds), run(2, mode, args.seconds)
            print(f"{mode:8s} get 1 proc {one / 1e6:.2f}M/s  2 procs {two / 1e6:.2f}M/s  ratio {two / one:.2f}")


if __name__ == "__main__":
    main()
