"""The ``fastmmap`` command-line tool (also ``python -m fastmmap``).

Subcommands:
  demo   N forked worker processes hammer one shared Cache and check that
         every value they read back is intact and that an atomic counter
         lost no increment.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]

# ---------------------------------------------------------------- demo

DEMO_CACHE_SIZE = "16m"
DEMO_VALUE_SIZE = 100
DEMO_COUNTER_KEY = "demo:counter"
DEMO_GET_RATIO = 0.9  # the rest are sets
DEMO_OPS_PER_INCREMENT = 32  # one get_and_set on the counter per this many ops
DEMO_SCHEDULE_LEN = 1 << 16  # precomputed random operations per worker


def _demo_key(i: int) -> str:
    return f"demo:{i}"


def _demo_value(key: str) -> bytes:
    """100 bytes that can only belong to `key`: the key, then its SHA-1
    repeated, so a torn, stale-from-another-key or corrupt value never
    compares equal."""
    kb = key.encode()
    digest = hashlib.sha1(kb).hexdigest().encode()
    body = kb + b"|" + digest * (DEMO_VALUE_SIZE // len(digest) + 1)
    return body[:DEMO_VALUE_SIZE]


def _demo_increment(key: Any, old: Any) -> int:
    return (old or 0) + 1


def _demo_worker(
    idx: int,
    cache: Any,
    keys: list[str],
    values: list[bytes],
    seconds: float,
    start: Any,
    results: Any,
) -> None:
    """Body of one forked worker: run until `seconds` have passed, then put
    a dict of counts on the `results` queue."""
    report: dict[str, Any] = {"worker": idx}
    try:
        rng = random.Random(1000 + idx)
        nkeys = len(keys)
        # Precompute the random schedule so that the timed loop measures
        # the cache, not the random module.
        schedule = []
        for _ in range(DEMO_SCHEDULE_LEN):
            i = rng.randrange(nkeys)
            schedule.append((keys[i], values[i], rng.random() < DEMO_GET_RATIO))

        get = cache.get
        set_ = cache.set
        get_and_set = cache.get_and_set
        gets = hits = corrupt = sets = set_failed = increments = 0
        pos = 0
        start.wait()
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while True:
            for key, value, is_get in schedule[pos : pos + DEMO_OPS_PER_INCREMENT]:
                if is_get:
                    gets += 1
                    got = get(key)
                    if got is not None:
                        hits += 1
                        if got != value:
                            corrupt += 1
                elif set_(key, value):
                    sets += 1
                else:
                    set_failed += 1
            pos = (pos + DEMO_OPS_PER_INCREMENT) % DEMO_SCHEDULE_LEN
            get_and_set(DEMO_COUNTER_KEY, _demo_increment)
            increments += 1
            if time.perf_counter() >= deadline:
                break
        elapsed = time.perf_counter() - t0
        cache.close()
        report.update(
            elapsed=elapsed,
            gets=gets,
            hits=hits,
            corrupt=corrupt,
            sets=sets,
            set_failed=set_failed,
            increments=increments,
        )
    except BaseException:  # report anything, even KeyboardInterrupt
        report["error"] = traceback.format_exc()
    results.put(report)


def _fmt_size(n: int) -> str:
    for unit, mult in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= mult:
            value = n / mult
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"


def _cmd_demo(args: argparse.Namespace) -> int:
    import multiprocessing
    import queue

    import fastmmap

    ctx = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="fastmmap-demo-") as tmp:
        path = os.path.join(tmp, "demo.cache")
        # The temporary directory removes the file; the Cache need not.
        cache = fastmmap.Cache(share_file=path, cache_size=DEMO_CACHE_SIZE, unlink_on_exit=False)
        try:
            # Keep the working set well inside the cache so that no entry,
            # and above all not the counter, is evicted: the checks below
            # must hold exactly.
            max_keys = cache.cache_size // 512
            if args.keys > max_keys:
                print(
                    f"fastmmap demo: --keys {args.keys} is too many for a "
                    f"{_fmt_size(cache.cache_size)} cache (at most {max_keys})",
                    file=sys.stderr,
                )
                return 2
            keys = [_demo_key(i) for i in range(args.keys)]
            values = [_demo_value(k) for k in keys]
            if not cache.set(DEMO_COUNTER_KEY, 0):
                print("fastmmap demo: could not store the counter", file=sys.stderr)
                return 1

            print(
                f"fastmmap demo: {args.workers} worker processes for "
                f"{args.seconds:g} s, {args.keys:,} keys of {DEMO_VALUE_SIZE}-byte "
                f"values, {DEMO_GET_RATIO:.0%} get / {1 - DEMO_GET_RATIO:.0%} set, "
                f"a shared counter bumped with get_and_set every "
                f"{DEMO_OPS_PER_INCREMENT} ops"
            )
            print(
                f"cache: {cache.share_file}: {cache.num_pages} pages x "
                f"{_fmt_size(cache.page_size)} = {_fmt_size(cache.cache_size)}"
            )
            sys.stdout.flush()

            start = ctx.Event()
            results = ctx.Queue()
            procs = [
                ctx.Process(
                    target=_demo_worker,
                    args=(i, cache, keys, values, args.seconds, start, results),
                    name=f"fastmmap-demo-{i}",
                )
                for i in range(args.workers)
            ]
            for p in procs:
                p.start()
            start.set()

            reports: list[dict[str, Any]] = []
            ok = True
            wait_until = time.monotonic() + args.seconds + 60
            try:
                while len(reports) < len(procs):
                    try:
                        reports.append(results.get(timeout=max(0.1, wait_until - time.monotonic())))
                    except queue.Empty:
                        print(
                            f"FAIL: only {len(reports)} of {len(procs)} workers "
                            "reported in time (possible deadlock)",
                            file=sys.stderr,
                        )
                        ok = False
                        break
            finally:
                for p in procs:
                    p.join(timeout=5)
                    if p.is_alive():
                        p.terminate()
                        p.join()
            for p in procs:
                if p.exitcode != 0:
                    print(f"FAIL: {p.name} exited with status {p.exitcode}", file=sys.stderr)
                    ok = False

            reports.sort(key=lambda r: r["worker"])
            total_rate = 0.0
            gets = hits = corrupt = sets = set_failed = increments = 0
            for r in reports:
                if "error" in r:
                    print(f"worker {r['worker']}: FAILED\n{r['error']}", file=sys.stderr)
                    ok = False
                    continue
                ops = r["gets"] + r["sets"] + r["set_failed"] + r["increments"]
                rate = ops / r["elapsed"] if r["elapsed"] > 0 else 0.0
                total_rate += rate
                hit_rate = r["hits"] / r["gets"] if r["gets"] else 0.0
                print(
                    f"worker {r['worker']}: {rate:>12,.0f} ops/s  "
                    f"gets {r['gets']:,} (hits {hit_rate:.1%})  sets {r['sets']:,}  "
                    f"increments {r['increments']:,}"
                    + (f"  sets refused {r['set_failed']:,}" if r["set_failed"] else "")
                )
                gets += r["gets"]
                hits += r["hits"]
                corrupt += r["corrupt"]
                sets += r["sets"]
                set_failed += r["set_failed"]
                increments += r["increments"]
            hit_rate = hits / gets if gets else 0.0
            print(f"total:    {total_rate:>12,.0f} ops/s  hit rate {hit_rate:.1%}")

            counter = cache.get(DEMO_COUNTER_KEY)
            counter_ok = counter == increments
            print(
                f"counter: expected {increments}, got {counter} - "
                + ("OK" if counter_ok else "FAIL")
            )
            values_ok = corrupt == 0
            print(
                f"values verified: {hits}, corrupt: {corrupt} - " + ("OK" if values_ok else "FAIL")
            )
            ok = ok and counter_ok and values_ok
            return 0 if ok else 1
        finally:
            cache.close()


# ---------------------------------------------------------------- main


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return x


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastmmap",
        description="fastmmap: a cache shared between processes through an mmap'ed file.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser(
        "demo",
        help="run forked workers against one shared cache and verify the results",
        description=(
            "Fork worker processes that share one fastmmap.Cache on a temporary "
            "file: each does 90%% get / 10%% set of 100-byte values that encode "
            "their key's checksum, and bumps one shared counter with "
            "get_and_set. Prints ops/s and hit rates, then checks that no value "
            "was corrupt and no increment was lost. Exit status 0 only if both "
            "checks pass."
        ),
    )
    demo.add_argument(
        "--workers", type=_positive_int, default=4, help="worker processes (default 4)"
    )
    demo.add_argument("--seconds", type=_positive_float, default=3.0, help="run time (default 3)")
    demo.add_argument(
        "--keys", type=_positive_int, default=10000, help="distinct keys (default 10000)"
    )
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default sys.argv[1:]); return the exit status."""
    args = _build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
