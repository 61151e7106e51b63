"""Deterministic per-operation instruction counts for the hot path, under callgrind.

    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p \
        .venv/bin/python benchmarks/callgrind_ops.py get 120000

Runs N operations of one kind over 10,000 16-byte keys in a 64 MiB cache
(the shape of run.py's 100 B and small-dict cells, without its timer).  Run it
twice (N=20000 and N=120000) and divide the difference of the "Collected"
totals by 100,000: setup cancels out and what is left is one loop iteration
(the loop itself, the call and the operation).  Add --cache-sim=yes for
simulated cache misses.  Operations: get, set (100 B bytes values), dget, dset
(the small dict through pickle), ploads, pdumps (pickle alone) and empty
(dict.get on an empty dict: the loop's own floor).  An optional third
argument is the page size (default 64k), to compare geometries.
"""

import os
import pickle
import random
import sys

import fastmmap

SMALL_DICT = {"id": 12345, "name": "alice", "tags": ["a", "b"], "score": 3.14, "active": True}


def main(op, n, page_size="64k"):
    path = "/dev/shm/cgbench-%d.cache" % os.getpid()
    c = fastmmap.Cache(path, init_file=True, cache_size="64m", page_size=page_size)
    keys = [b"k%015d" % i for i in range(10000)]
    v = SMALL_DICT if op in ("dget", "dset") else random.Random(100).randbytes(100)
    for k in keys:
        c.set(k, v)
    ks = random.Random(1).choices(keys, k=20000) * (n // 20000)
    get, set_ = c.get, c.set
    none = 0
    if op in ("get", "dget"):
        for k in ks:
            if get(k) is None:
                none += 1
    elif op in ("set", "dset"):
        for k in ks:
            if set_(k, v) is False:
                none += 1
    elif op == "empty":
        g = {}.get
        for k in ks:
            if g(k) is None:
                none += 1
    elif op == "ploads":
        b, f = pickle.dumps(SMALL_DICT), pickle.loads
        for k in ks:
            if f(b) is None:
                none += 1
    elif op == "pdumps":
        f = pickle.dumps
        for k in ks:
            if f(SMALL_DICT) is None:
                none += 1
    else:
        raise SystemExit("unknown op " + op)
    c.close()
    if os.path.exists(path):
        os.unlink(path)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:4])
