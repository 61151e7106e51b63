"""examples/asgi_counter.py under ``uvicorn --workers 4``: an exact counter.

FastAPI on fastmmap.contrib.aiocache.FastMmapCache: uvicorn serves the
example on a free loopback port with 4 worker processes (each imports the
module and opens the file); 16 client threads send 20,000 requests to
/incr over keep-alive connections (a new one every 100 requests).  Every response must carry a distinct
value of 1..20,000 (so the increments were atomic across workers), the
counter must end at exactly 20,000, and more than one worker must have
served.  Then /square/n: computed once, by one worker, served by the others
from the shared cache.  The server is stopped with SIGTERM in a finally
block.
"""

from __future__ import annotations

import http.client
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="fastapi is in the test extra")
pytest.importorskip("uvicorn", reason="uvicorn is in the test extra")
pytest.importorskip("aiocache", reason="aiocache is in the test extra")

import fastmmap  # noqa: E402
from test_servers import START_TIMEOUT, Server, _free_port, request, request_retrying  # noqa: E402

pytestmark = pytest.mark.timeout(600)

REQUESTS = 20_000
CLIENTS = 16
WORKERS = 4
# Requests per connection.  An asyncio worker accepts every connection
# that is waiting, so 16 connections opened at once can all land on one
# worker: new connections along the way reach the others.
PER_CONNECTION = 100


def hammer(port: int, path: str, total: int, clients: int = CLIENTS):
    """total GETs from clients threads, each on a new keep-alive connection
    every PER_CONNECTION requests.  Returns (values, pids, retries)."""
    shares = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]
    results: list = [None] * clients

    def client(i: int) -> None:
        values, pids, retries = [], set(), 0
        conn = None
        try:
            for n in range(shares[i]):
                if n % PER_CONNECTION == 0:
                    if conn is not None:
                        conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                status, body, pid, retried = request_retrying(port, path, conn)
                retries += retried
                assert status == 200, (status, body)
                values.append(int(body))
                pids.add(pid)
            results[i] = (values, pids, retries)
        except BaseException as e:  # reported by the main thread
            results[i] = e
        finally:
            if conn is not None:
                conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    values, pids, retries = [], set(), 0
    for r in results:
        if isinstance(r, BaseException):
            raise r
        assert r is not None, "a client thread did not finish"
        values += r[0]
        pids |= r[1]
        retries += r[2]
    return values, pids, retries


class UvicornServer(Server):
    def start(self) -> None:
        for _attempt in range(3):  # the free port may be taken in between
            self.port = _free_port()
            cmd = [
                sys.executable, "-m", "uvicorn", "examples.asgi_counter:app",
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(WORKERS),
                "--no-access-log", "--log-level", "warning",
            ]
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    cmd, cwd=Path(__file__).resolve().parent.parent, env=self.env,
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )
            if self._wait_ready():
                return
            self.stop()
            if "in use" not in self.log():
                break
        pytest.fail(f"uvicorn did not start within {START_TIMEOUT} s:\n{self.log()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = UvicornServer("uvicorn", tmp_path_factory.mktemp("uvicorn"))
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def test_counter_is_exact_across_workers(server):
    start = time.monotonic()
    values, pids, retries = hammer(server.port, "/incr", REQUESTS)
    elapsed = time.monotonic() - start
    print(f"uvicorn /incr: {len(values)} responses from {len(pids)} workers in {elapsed:.1f} s, {retries} retries")
    assert len(values) == REQUESTS
    lost = sorted(set(range(1, REQUESTS + 1)) - set(values))
    assert sorted(values) == list(range(1, REQUESTS + 1)), f"duplicates or gaps, missing {lost[:10]}"
    assert request(server.port, "/value")[:2] == (200, str(REQUESTS))
    assert len(pids) > 1, f"only worker {pids} served: the test did not exercise several processes"
    # the file itself, opened from here: the same count
    with fastmmap.Cache(server.cache_path) as c:
        assert c["counter:hits"] == REQUESTS


def test_cached_results_are_shared_by_the_workers(server):
    values, pids, _ = hammer(server.port, "/square/12", 2000)
    assert values == [144] * 2000
    assert len(pids) > 1
    # every worker served the value that one of them computed
    computers = {request_computed_by(server.port, "/square/12") for _ in range(20)}
    assert len(computers) == 1


def request_computed_by(port: int, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.getheader("X-Computed-By") or ""
    finally:
        conn.close()
