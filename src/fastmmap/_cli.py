"""The ``fastmmap`` command-line tool (also ``python -m fastmmap``).

Subcommands:
  demo   N forked worker processes hammer one shared Cache and check that
         every value they read back is intact and that an atomic counter
         lost no increment.
"""

from __future__ import annotations

import argparse
import json
import hashlib
import importlib
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


# ----- commands on an existing cache file -----


def _open_existing(path: str, args: argparse.Namespace | None = None) -> Any:
    """Open an existing cache file (never create one); exit status 2 if absent.

    --format perl opens a Cache::FastMmap file: it has no header, so the
    geometry comes from --cache-size / --page-size / --num-pages (Perl's
    defaults if none), exactly as a Perl process would compute it.
    """
    import fastmmap

    if not os.path.exists(path):
        print(f"fastmmap: {path}: no such cache file", file=sys.stderr)
        raise SystemExit(2)
    try:
        if args is not None and getattr(args, "format", "native") == "perl":
            return fastmmap.Cache(
                path, unlink_on_exit=False, format="perl", serializer="raw",
                cache_size=args.cache_size, page_size=args.page_size, num_pages=args.num_pages,
            )
        return fastmmap.Cache(path, unlink_on_exit=False)
    except (fastmmap.Error, OSError) as e:
        print(f"fastmmap: {path}: {e}", file=sys.stderr)
        raise SystemExit(2)


def _progress(i: int, n: int, what: str) -> None:
    """A progress line on stderr for long runs (only on a terminal)."""
    if n >= 512 and sys.stderr.isatty() and (i % 256 == 0 or i == n):
        print(f"\r{what}: page {i}/{n}", end="" if i < n else "\n", file=sys.stderr, flush=True)


def _cmd_stats(args: argparse.Namespace) -> int:
    with _open_existing(args.file, args) as c:
        n = c.num_pages
        pages = []
        for p in range(n):
            pages.append(c._page_info(p))
            _progress(p + 1, n, "stats")
        data_bytes = sum(c.page_size - i["data_start"] for i in pages)
        live_bytes = sum(i["live_bytes"] for i in pages)
        reads = sum(i["nreads"] for i in pages)
        hits = sum(i["nhits"] for i in pages)
        out = {
            "file": args.file,
            "page_size": c.page_size,
            "num_pages": n,
            "cache_size": c.cache_size,
            "entries": sum(i["live"] - i["expired"] - i["tombstones"] for i in pages),
            "expired_entries": sum(i["expired"] for i in pages),
            "tombstones": sum(i["tombstones"] for i in pages),
            "deleted_slots": sum(i["deleted"] for i in pages),
            "slots": sum(i["num_slots"] for i in pages),
            "live_bytes": live_bytes,
            "fill": live_bytes / data_bytes if data_bytes else 0.0,
            "reads": reads,
            "read_hits": hits,
            "hit_rate": hits / reads if reads else None,
            "repaired_pages": c.repaired_pages(),
        }
        if args.pages:
            out["pages"] = pages
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"file            {out['file']}")
    print(f"geometry        {n} pages x {_fmt_size(out['page_size'])} = {_fmt_size(out['cache_size'])}")
    print(f"entries         {out['entries']} live, {out['expired_entries']} expired, "
          f"{out['tombstones']} tombstones")
    print(f"slots           {out['slots']} ({out['deleted_slots']} deleted)")
    print(f"fill            {out['fill']:.1%} of data areas ({_fmt_size(live_bytes)} live)")
    if reads:
        print(f"hit rate        {out['hit_rate']:.1%} of {reads} reads (enable_stats)")
    else:
        print("hit rate        n/a (no reads counted: open caches with enable_stats=True)")
    print(f"repaired pages  {out['repaired_pages']}")
    if args.pages:
        for p, i in enumerate(pages):
            print(f"  page {p}: {i}")
    return 0


def _show_key(k: Any) -> str:
    return k if isinstance(k, str) else repr(k)


def _cmd_keys(args: argparse.Namespace) -> int:
    with _open_existing(args.file, args) as c:
        for k in c.keys():
            print(_show_key(k))
    return 0


def _cmd_get(args: argparse.Namespace) -> int:
    import fastmmap

    with _open_existing(args.file, args) as c:
        try:
            value = c.get(args.key, _MISSING)
        except fastmmap.Error as e:
            print(f"fastmmap: {e}", file=sys.stderr)
            return 2
    if value is _MISSING:
        print(f"fastmmap: {args.key!r}: not found", file=sys.stderr)
        return 1
    if isinstance(value, bytes) and args.raw:
        sys.stdout.buffer.write(value)
    elif isinstance(value, str):
        print(value)
    else:
        print(repr(value))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from fastmmap import _fastmmap

    # Before the open, which would remove them silently; they exist even
    # when the creator died before the cache file did.
    for name, size in _fastmmap._reap_temps(args.file, True):
        print(f"removed {name} ({_fmt_size(size)}): a temporary file whose creator died while creating the cache")
    with _open_existing(args.file, args) as c:
        problems = c.check()
        repaired = c.repaired_pages()
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} problem(s) found in {args.file}", file=sys.stderr)
        return 1
    print(f"{args.file}: all pages valid ({repaired} repaired over the file's life)")
    return 0


def _cmd_clear(args: argparse.Namespace) -> int:
    with _open_existing(args.file, args) as c:
        before = len(c)
        c.clear()
    print(f"{args.file}: removed {before} entries")
    return 0


_MISSING = object()


# ----- bench: a quick table against the peers that are installed -----


class _LmdbStore:
    """py-lmdb with one transaction per operation, for ``fastmmap bench``."""

    def __init__(self, path: str) -> None:
        self.env = importlib.import_module("lmdb").open(path, map_size=1 << 28, sync=False)

    def get(self, k: bytes) -> Any:
        with self.env.begin() as t:
            return t.get(k)

    def __setitem__(self, k: bytes, v: bytes) -> None:
        with self.env.begin(write=True) as t:
            t.put(k, v)

    def close(self) -> None:
        self.env.close()


def _bench_peers(tmpdir: str) -> list[tuple[str, Any]]:
    """(name, factory) for fastmmap, a dict, and the peers importable here."""
    import fastmmap

    peers: list[tuple[str, Any]] = [
        ("fastmmap", lambda: fastmmap.Cache(os.path.join(tmpdir, "f.cache"), cache_size="16m")),
        ("dict (in-process, not shared)", dict),
    ]
    try:
        diskcache = importlib.import_module("diskcache")  # optional peer

        peers.append(("diskcache.Cache", lambda: diskcache.Cache(os.path.join(tmpdir, "dc"))))
    except ImportError:
        pass
    try:
        importlib.import_module("lmdb")  # optional peer
        peers.append(("py-lmdb (sync off)", lambda: _LmdbStore(os.path.join(tmpdir, "lmdb"))))
    except ImportError:
        pass
    return peers


def _cmd_bench(args: argparse.Namespace) -> int:
    keys = [b"%016d" % i for i in range(1000)]
    value = os.urandom(100)
    n = args.ops
    print(f"one process, 16-byte keys, 100-byte values, {n} operations each (best of 3)")
    print(f"{'peer':32} {'get hit/s':>12} {'set/s':>12}")
    with tempfile.TemporaryDirectory(prefix="fastmmap-bench-") as tmpdir:
        for name, factory in _bench_peers(tmpdir):
            store = factory()
            for k in keys:
                store[k] = value
            get = store.get
            ks = (keys * (n // len(keys) + 1))[:n]

            def run_get() -> None:
                for k in ks:
                    get(k)

            def run_set() -> None:
                for k in ks:
                    store[k] = value

            rates = []
            for fn in (run_get, run_set):
                best = float("inf")
                for _ in range(3):
                    t = time.perf_counter()
                    fn()
                    best = min(best, time.perf_counter() - t)
                rates.append(n / best)
            print(f"{name:32} {_fmt_rate(rates[0]):>12} {_fmt_rate(rates[1]):>12}", flush=True)
            close = getattr(store, "close", None)
            if close:
                close()
    print("full comparison (Redis, memcached, Perl, several processes): make bench")
    return 0


def _fmt_rate(r: float) -> str:
    return f"{r / 1e6:.2f}M" if r >= 1e6 else f"{r / 1e3:.0f}k"


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

    be = sub.add_parser("bench", help="quick get/set table against the peers installed here")
    be.add_argument("--ops", type=_positive_int, default=200000, help="operations per measurement")
    be.set_defaults(func=_cmd_bench)

    # options of the commands that open an existing file
    fmt = argparse.ArgumentParser(add_help=False)
    fmt.add_argument(
        "--format", choices=("native", "perl"), default="native",
        help="file format (default native); perl: a Cache::FastMmap file, read with serializer='raw'",
    )
    fmt.add_argument("--cache-size", default=None, help="format perl: Perl's cache_size option")
    fmt.add_argument("--page-size", default=None, help="format perl: Perl's page_size option")
    fmt.add_argument("--num-pages", type=_positive_int, default=None, help="format perl: Perl's num_pages option")

    st = sub.add_parser("stats", parents=[fmt], help="geometry, fill, entries, hit rate and repairs of a cache file")
    st.add_argument("file")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.add_argument("--pages", action="store_true", help="include per-page counters")
    st.set_defaults(func=_cmd_stats)

    ks = sub.add_parser("keys", parents=[fmt], help="list the live keys of a cache file")
    ks.add_argument("file")
    ks.set_defaults(func=_cmd_keys)

    g = sub.add_parser("get", parents=[fmt], help="print the value of KEY (exit status 1 if absent)")
    g.add_argument("file")
    g.add_argument("key")
    g.add_argument("--raw", action="store_true", help="write bytes values unchanged to stdout")
    g.set_defaults(func=_cmd_get)

    ck = sub.add_parser(
        "check", parents=[fmt],
        help="validate every page (exit status 1 on problems); remove temporary files of dead creators",
    )
    ck.add_argument("file")
    ck.set_defaults(func=_cmd_check)

    cl = sub.add_parser("clear", parents=[fmt], help="remove every entry of a cache file")
    cl.add_argument("file")
    cl.set_defaults(func=_cmd_clear)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default sys.argv[1:]); return the exit status."""
    args = _build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
