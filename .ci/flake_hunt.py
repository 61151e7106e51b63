#!/usr/bin/env python3
"""Run the pytest suite several times on a loaded machine; report each
test that failed even once.

A test that synchronises by sleeping, or that asserts how long something
took, passes on an idle machine and fails when the scheduler runs its
processes late.  Busy loops (one per core by default) make that happen:
the suite then runs at about half speed with every wake-up delayed.

    python .ci/flake_hunt.py [--runs N] [--load N] [--out DIR] [-- PYTEST ARGS]

Each run gets its own FASTMMAP_TEST_SEED (printed with its failures, to
replay a seeded test) and its own log and JUnit XML file under --out.
The report is rewritten after every run, so an interrupted hunt still
leaves the runs it finished.  Exits 1 when any test failed, else 0.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

BUSY_LOOP = "while True: pass"


def failed_tests(junit_xml: Path) -> list[str]:
    """Test ids (module::name) with a failure or error in one run's XML."""
    try:
        root = ET.parse(junit_xml).getroot()
    except (OSError, ET.ParseError):
        return ["<no junit report: pytest crashed or was killed>"]
    out = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            out.append(f"{case.get('classname')}::{case.get('name')}")
    return out


def write_report(path: Path, runs_done: int, runs_asked: int, load: int,
                 failures: dict[str, list[tuple[int, int]]], seconds: list[float]) -> str:
    lines = [f"flake hunt: {runs_done} of {runs_asked} runs done, {load} busy loops"]
    if seconds:
        lines.append("run times: " + ", ".join(f"{s:.0f} s" for s in seconds))
    if not failures:
        lines.append("no test failed")
    for test, hits in sorted(failures.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        where = ", ".join(f"run {run} (FASTMMAP_TEST_SEED={seed})" for run, seed in hits)
        lines.append(f"FAILED {len(hits)}/{runs_done}: {test}: {where}")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--load", type=int, default=os.cpu_count() or 2,
                    help="busy loops to run alongside (default: one per core)")
    ap.add_argument("--out", type=Path, default=Path("build/flake-hunt"))
    ap.add_argument("pytest_args", nargs="*", default=["-m", "not stress"])
    args = ap.parse_args()
    if args.runs < 1 or args.load < 0:
        ap.error("--runs must be at least 1 and --load at least 0")
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / "report.txt"

    # make's SIGTERM must not leave the busy loops running: run the finally.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(args.load)]
    failures: dict[str, list[tuple[int, int]]] = {}
    seconds: list[float] = []
    done = 0
    try:
        for run in range(1, args.runs + 1):
            seed = random.SystemRandom().randrange(2**32)
            xml = args.out / f"run-{run}.xml"
            xml.unlink(missing_ok=True)
            env = dict(os.environ, FASTMMAP_TEST_SEED=str(seed))
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   f"--junitxml={xml}", *args.pytest_args]
            t0 = time.monotonic()
            with open(args.out / f"run-{run}.log", "wb") as log:
                suite = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
                try:
                    rc = suite.wait()
                finally:
                    if suite.poll() is None:  # interrupted: stop the run too
                        suite.kill()
                        suite.wait()
            seconds.append(time.monotonic() - t0)
            failed = failed_tests(xml)
            if rc != 0 and not failed:
                failed = [f"<pytest exited {rc} with no failed test: see run-{run}.log>"]
            for test in failed:
                failures.setdefault(test, []).append((run, seed))
            done = run
            print(f"flake hunt: run {run}/{args.runs}: {len(failed)} failed, {seconds[-1]:.0f} s", flush=True)
            write_report(report, done, args.runs, args.load, failures, seconds)
    finally:
        for p in busy:
            p.kill()
        for p in busy:
            p.wait()
    print(write_report(report, done, args.runs, args.load, failures, seconds), end="")
    print(f"(logs and this report in {args.out})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
