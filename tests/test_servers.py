"""fastmmap under real pre-forking servers and multiprocessing pools.

- gunicorn (``--preload``, 4 sync workers) and uWSGI (master + 4 processes,
  app loaded before the fork) serve examples/wsgi_counter.py on a free
  loopback port; 8 client threads send 2,000 requests to /incr, and every
  response must carry a distinct value of 1..2,000 (so the increments were
  atomic across workers), the counter must end at exactly 2,000, and more
  than one worker must have served.  The same through Django's cache API
  (/django-incr, fastmmap.contrib.django.FastMmapCache).
- multiprocessing pools with fork and with spawn (the cache reaches spawn
  workers by pickling: "reopen this file") add keys and increment one
  counter with get_and_set; the totals must be exact.

The servers run as subprocesses from the repository root, with the cache
file in a temporary directory (FASTMMAP_COUNTER_CACHE); they are stopped
with SIGTERM in a finally block.
"""

from __future__ import annotations

import http.client
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import pytest

import fastmmap

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
REQUESTS = 2000
CLIENTS = 8
WORKERS = 4
START_TIMEOUT = 60.0  # a busy 2-core CI machine can be slow to import Django


# ---------------------------------------------------------------- servers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _uwsgi_binary() -> str | None:
    """The uwsgi that pip installed for this Python (``pip install uwsgi``).

    Not any uwsgi on PATH: Debian's (benchmarks/APT_PACKAGES) needs a
    plugin to run Python at all, and then runs the system's Python.
    """
    for scripts in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        binary = scripts / "uwsgi"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    return None


def _gunicorn_cmd(port: int) -> list[str]:
    return [
        sys.executable, "-m", "gunicorn",
        "-c", str(EXAMPLES / "gunicorn.conf.py"),  # preload_app = True, wsgi_app
        "--bind", f"127.0.0.1:{port}", "--workers", str(WORKERS),
        "--graceful-timeout", "10",
    ]


def _uwsgi_cmd(port: int) -> list[str]:
    binary = _uwsgi_binary()
    assert binary is not None
    return [
        binary, "--master", "--processes", str(WORKERS),
        "--http-socket", f"127.0.0.1:{port}",
        "--wsgi-file", str(EXAMPLES / "wsgi_counter.py"), "--callable", "app",
        # not --lazy-apps: the app (and its cache) is loaded before the fork
        "--home", sys.prefix, "--need-app", "--die-on-term", "--disable-logging",
        "--add-header", "Connection: close",  # uWSGI closes anyway: say so
        "--worker-reload-mercy", "10",
    ]


class Server:
    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind = kind
        self.cache_path = workdir / "counter.cache"
        self.log_path = workdir / f"{kind}.log"
        self.env = dict(
            os.environ,
            FASTMMAP_COUNTER_CACHE=str(self.cache_path),
            XDG_RUNTIME_DIR=str(workdir),  # gunicorn >= 25 puts its control socket there
            PYTHONUNBUFFERED="1",
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def start(self) -> None:
        cmd = _gunicorn_cmd if self.kind == "gunicorn" else _uwsgi_cmd
        for _attempt in range(3):  # the free port may be taken in between
            self.port = _free_port()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    cmd(self.port), cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )
            if self._wait_ready():
                return
            self.stop()
            if "in use" not in self.log():
                break
        pytest.fail(f"{self.kind} did not start:\n{self.log()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                status, _, _ = request(self.port, "/value")
                if status == 200:
                    return True
            except OSError:
                pass
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # graceful shutdown of master and workers
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what we started
            proc.wait()


def request(port: int, path: str, conn: http.client.HTTPConnection | None = None) -> tuple[int, str, int]:
    """GET path: (status, body, worker pid)."""
    own = conn is None
    if conn is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read().decode()
        return resp.status, body.strip(), int(resp.getheader("X-Worker-Pid") or 0)
    finally:
        if own:
            conn.close()


def request_retrying(port: int, path: str, conn: http.client.HTTPConnection) -> tuple[int, str, int, int]:
    """request() on a kept-alive connection: (status, body, worker pid,
    retries).  Only a connection the server closed while idle is retried:
    the request never reached the app.  (A double count would still show
    in the values.)"""
    for attempt in range(3):
        reused = conn.sock is not None
        try:
            return (*request(port, path, conn), attempt)
        except (http.client.RemoteDisconnected, ConnectionError):
            conn.close()
            if not reused or attempt == 2:
                raise
    raise AssertionError("unreachable")


def hammer(port: int, path: str, total: int = REQUESTS, clients: int = CLIENTS):
    """Send total requests from clients threads (keep-alive connections where
    the server keeps them).  Returns (values, pids, retries)."""
    shares = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]
    results: list = [None] * clients

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        values, pids, retries = [], set(), 0
        try:
            for _ in range(shares[i]):
                status, body, pid, retried = request_retrying(port, path, conn)
                retries += retried
                assert status == 200, (status, body)
                values.append(int(body))
                pids.add(pid)
            results[i] = (values, pids, retries)
        except BaseException as e:  # reported by the main thread
            results[i] = e
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    values, pids, retries = [], set(), 0
    for r in results:
        if isinstance(r, BaseException):
            raise r
        assert r is not None, "a client thread did not finish"
        values += r[0]
        pids |= r[1]
        retries += r[2]
    return values, pids, retries


SERVERS = [
    "gunicorn",
    pytest.param(
        "uwsgi",
        marks=pytest.mark.skipif(
            _uwsgi_binary() is None, reason="uwsgi is not installed for this Python (pip install uwsgi)"
        ),
    ),
]


@pytest.fixture(scope="module", params=SERVERS)
def server(request, tmp_path_factory):
    if request.param == "gunicorn":
        pytest.importorskip("gunicorn", reason="gunicorn is in the test extra")
    srv = Server(request.param, tmp_path_factory.mktemp(request.param))
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def _check_counter(server: Server, incr: str, value: str) -> None:
    values, pids, retries = hammer(server.port, incr)
    print(f"{server.kind} {incr}: {len(values)} responses from {len(pids)} workers, {retries} retries")
    assert len(values) == REQUESTS
    lost = sorted(set(range(1, REQUESTS + 1)) - set(values))
    assert sorted(values) == list(range(1, REQUESTS + 1)), f"duplicates or gaps, missing {lost[:10]}"
    assert request(server.port, value)[:2] == (200, str(REQUESTS))
    assert len(pids) > 1, f"only worker {pids} served: the test did not exercise several processes"


def test_lock_counter(server):
    _check_counter(server, "/incr", "/value")
    # the file itself, opened from here: the same count
    with fastmmap.Cache(server.cache_path) as c:
        assert c["hits"] == REQUESTS


def test_django_counter(server):
    status, body, _ = request(server.port, "/django-value")
    if status == 501:
        pytest.skip(f"/django-incr not tested: {body}")
    assert (status, body) == (200, "0")
    _check_counter(server, "/django-incr", "/django-value")


# ---------------------------------------------------------------- multiprocessing

KEYS_PER_TASK = 150
TASKS = 8

_inherited: fastmmap.Cache | None = None  # set before the fork pool starts


def _work(c: fastmmap.Cache, task: int) -> int:
    for i in range(KEYS_PER_TASK):
        assert c.add(f"t{task}:k{i}", (task, i))
        c.get_and_set("total", lambda key, old: (old or 0) + 1)
        with c.lock("locked-total") as e:
            e.value = (e.value or 0) + 1
    return os.getpid()


def _work_inherited(task: int) -> int:
    assert _inherited is not None, "the forked worker did not inherit the cache"
    return _work(_inherited, task)


def _check_totals(c: fastmmap.Cache) -> None:
    assert c["total"] == TASKS * KEYS_PER_TASK
    assert c["locked-total"] == TASKS * KEYS_PER_TASK
    for task in range(TASKS):
        for i in range(KEYS_PER_TASK):
            assert c[f"t{task}:k{i}"] == (task, i)
    assert len(c) == TASKS * KEYS_PER_TASK + 2


def test_pool_fork_inherits_the_cache(cache):
    global _inherited
    c = cache(cache_size="4m")
    _inherited = c
    try:
        with multiprocessing.get_context("fork").Pool(WORKERS) as pool:
            pids = pool.map(_work_inherited, range(TASKS))
    finally:
        _inherited = None
    assert os.getpid() not in pids
    _check_totals(c)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_pool_passes_the_cache_by_pickle(cache, method):
    c = cache(cache_size="4m")
    with multiprocessing.get_context(method).Pool(WORKERS) as pool:
        pids = pool.starmap(_work, [(c, task) for task in range(TASKS)])
    assert os.getpid() not in pids
    _check_totals(c)
    assert os.path.exists(c.share_file)  # workers closing their copies removed nothing
