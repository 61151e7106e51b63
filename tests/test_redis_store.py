"""fastmmap.contrib.redis.RedisStore against a real redis-server.

The module starts its own redis-server on a unix socket in a temporary
directory (no TCP port, no persistence) and stops it at teardown; every test
starts from an empty database.  Two caches on two files stand for two hosts
sharing one Redis.  No mocks: if redis-server or the redis package is
missing, the module is skipped with the reason.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import fastmmap

redis = pytest.importorskip("redis", reason="the redis package (redis-py) is not installed")
from fastmmap.contrib.redis import RedisStore  # noqa: E402

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0  # generous deadline for anything asynchronous (busy CI machines)


# ---------------------------------------------------------------- the server


def _wait_until(pred, timeout=WAIT, interval=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


@pytest.fixture(scope="module")
def redis_socket(tmp_path_factory):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    workdir = tmp_path_factory.mktemp("redis")
    sock = workdir / "redis.sock"
    short_dir = None
    if len(str(sock)) > 100:  # sun_path holds 108 bytes
        short_dir = tempfile.mkdtemp(prefix="fmr")
        sock = Path(short_dir) / "redis.sock"
    log = open(workdir / "redis.log", "wb")
    proc = subprocess.Popen(
        [exe, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
         "--save", "", "--appendonly", "no", "--dir", str(workdir), "--daemonize", "no"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    try:
        def ready():
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}: "
                                   f"{(workdir / 'redis.log').read_text(errors='replace')}")
            if not sock.exists():
                return False
            try:
                return redis.Redis(unix_socket_path=str(sock), socket_timeout=5).ping()
            except redis.ConnectionError:
                return False

        if not _wait_until(ready, timeout=30):
            raise RuntimeError("redis-server did not come up in 30 s")
        yield str(sock)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if short_dir:
            shutil.rmtree(short_dir, ignore_errors=True)


@pytest.fixture
def r(redis_socket):
    client = redis.Redis(unix_socket_path=redis_socket, socket_timeout=10)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def host(cache, r, redis_socket):
    """host(**store_options, cache_options...) -> (cache, store): one "host"."""

    def make(prefix="app:", serializer="pickle", channel=None, **cache_options):
        client = redis.Redis(unix_socket_path=redis_socket, socket_timeout=10)
        store = RedisStore(client, prefix=prefix, serializer=serializer, channel=channel)
        return cache(**store.cache_options(), **cache_options), store

    return make


# ---------------------------------------------------------------- read-through


def test_read_through(host, r):
    c, store = host()
    r.set("app:user:1", pickle.dumps({"name": "ada"}))
    assert c.get("user:1") == {"name": "ada"}
    r.delete("app:user:1")
    assert c.get("user:1") == {"name": "ada"}  # now a local hit
    assert c.get("user:2") is None  # absent in Redis: a miss, nothing cached
    assert "user:2" not in c
    with pytest.raises(KeyError):
        c["user:2"]
    r.set("app:user:2", pickle.dumps(None))  # a stored None reads as "not found"
    assert c.get("user:2", "dflt") == "dflt"


def test_read_through_bytes_and_str_values_keep_their_type(host, r):
    c, _ = host()
    r.set("app:b", pickle.dumps(b"\x00\xff"))
    r.set("app:s", pickle.dumps("héllo"))
    assert c.get("b") == b"\x00\xff"
    assert c.get(b"s") == "héllo"


# ---------------------------------------------------------------- write-through


def test_write_through_values_and_expiry(host, r):
    c, store = host()
    c.set("forever", [1, 2, 3])
    assert pickle.loads(r.get("app:forever")) == [1, 2, 3]
    assert r.ttl("app:forever") == -1

    c.set("ttl", "v", expire_time=100)
    assert 0 < r.ttl("app:ttl") <= 100
    assert r.get("app:ttl") == pickle.dumps("v", pickle.HIGHEST_PROTOCOL)

    at = int(time.time()) + 1000
    c.set("at", b"x", expire_on=at)
    assert r.expiretime("app:at") == at

    c["item"] = {"k": "v"}  # the cache's default expiry (never)
    assert r.ttl("app:item") == -1

    c[b"bin\xffkey"] = 1
    assert pickle.loads(r.get(b"app:bin\xffkey")) == 1

    with c.lock("locked") as e:
        e.value = 41
        e.value = e.value + 1
    assert pickle.loads(r.get("app:locked")) == 42


def test_cache_default_expiry_maps_to_exat(host, r):
    c, _ = host(expire_time=300)
    before = int(time.time())
    c["k"] = 1
    assert before + 299 <= r.expiretime("app:k") <= int(time.time()) + 301


def test_delete_through(host, r):
    c, _ = host()
    c["k"] = 1
    assert r.exists("app:k")
    del c["k"]
    assert not r.exists("app:k")
    r.set("app:only-remote", pickle.dumps(1))
    assert not c.remove("only-remote")  # not in the cache, deleted from Redis anyway
    assert not r.exists("app:only-remote")
    c["p"] = 2
    assert c.pop("p") == 2  # pop calls no callbacks
    assert r.exists("app:p")


def test_expired_write_deletes_in_redis(host, r):
    c, store = host()
    r.set("app:old", b"stale")
    store.write_cb(None, "old", "new", int(time.time()) - 10)
    assert not r.exists("app:old")


def test_two_hosts_share_through_redis(host, r):
    a, _ = host()
    b, _ = host()
    a["config"] = {"debug": True}
    assert b.get("config") == {"debug": True}  # read through from what A wrote
    assert b.exists("config")


def test_json_serializer_and_prefix(host, r):
    c, _ = host(prefix=b"j/", serializer="json")
    c["cfg"] = {"ids": (1, 2), "name": "é"}
    assert r.get("j/cfg") == '{"ids":[1,2],"name":"é"}'.encode()
    c2, _ = host(prefix="j/", serializer="json")
    assert c2["cfg"] == {"ids": [1, 2], "name": "é"}
    with pytest.raises(TypeError):
        c["bad"] = {1, 2}  # json cannot encode a set: the store raises, the caller sees it


def test_custom_serializer(host, r):
    import marshal

    c, store = host(serializer=(marshal.dumps, marshal.loads))
    c["m"] = {"a": [1, 2]}
    assert marshal.loads(r.get("app:m")) == {"a": [1, 2]}
    assert store.read_cb(None, "m") == {"a": [1, 2]}


def test_bad_options(redis_socket):
    client = redis.Redis(unix_socket_path=redis_socket)
    with pytest.raises(ValueError):
        RedisStore(client, serializer="yaml")
    with pytest.raises(ValueError):
        RedisStore(redis.Redis(unix_socket_path=redis_socket, decode_responses=True))
    with pytest.raises(ValueError):
        RedisStore(client).subscribe(None)  # no channel
    assert set(RedisStore(client).cache_options()) == {"read_cb", "write_cb", "delete_cb"}


# ---------------------------------------------------------------- write-back


def test_write_back_flushes_on_empty(host, r):
    c, _ = host(write_action="write_back")
    c.set("a", 1, expire_time=500)
    c["b"] = "two"
    assert not r.exists("app:a") and not r.exists("app:b")  # only dirty in the cache
    assert c["a"] == 1
    c.empty()
    assert pickle.loads(r.get("app:a")) == 1
    assert pickle.loads(r.get("app:b")) == "two"
    assert 0 < r.ttl("app:a") <= 500
    assert r.ttl("app:b") == -1
    assert len(c) == 0
    assert c.get("a") == 1  # read back through


def test_write_back_writes_evicted_entries(host, r):
    c, _ = host(write_action="write_back", page_size="4k", num_pages=1)
    values = {f"k{i}": os.urandom(300) for i in range(60)}  # ~18 KB into one 4 KiB page
    for k, v in values.items():
        c[k] = v
    evicted = [k for k in values if r.exists(f"app:{k}")]
    assert evicted, "nothing was evicted"
    for k in evicted:
        assert pickle.loads(r.get(f"app:{k}")) == values[k]
    c.empty()
    for k, v in values.items():
        assert pickle.loads(r.get(f"app:{k}")) == v
    # another host reads them all through
    other, _ = host(cache_size="1m")
    assert all(other[k] == v for k, v in values.items())


def test_write_back_remove_drops_dirty_and_deletes_remote(host, r):
    c, _ = host(write_action="write_back")
    r.set("app:k", pickle.dumps("remote"))
    c["k"] = "local"
    c.remove("k")
    c.empty()
    assert not r.exists("app:k")


# ---------------------------------------------------------------- invalidation


def test_invalidation_across_hosts(host, r):
    a, store_a = host(channel="inval")
    b, store_b = host(channel="inval")
    assert store_a.origin != store_b.origin
    with store_a.subscribe(a) as sub_a, store_b.subscribe(b) as sub_b:
        a["k"] = "v1"
        assert _wait_until(lambda: sub_b.messages >= 1)  # A's first write reached B
        assert b["k"] == "v1"  # B reads through and caches
        assert b.exists("k") and a.exists("k")

        start = time.monotonic()
        a["k"] = "v2"
        assert _wait_until(lambda: not b.exists("k")), "B kept its stale copy"
        latency = time.monotonic() - start
        print(f"invalidation reached B after {latency * 1000:.1f} ms")
        assert b["k"] == "v2"  # read through the new value

        # A ignores its own messages: B's next message arrives after A's own,
        # so once A has seen it, A's copy must still be there.
        seen = sub_a.messages
        b.remove("unrelated")
        assert _wait_until(lambda: sub_a.messages > seen)
        assert a.get("k") == "v2" and a.exists("k")

        # deletes invalidate too; get_and_remove does not touch Redis
        b.remove("k")
        assert _wait_until(lambda: not a.exists("k"))
        assert not r.exists("app:k")
        assert sub_a.errors == 0 and sub_b.errors == 0
    assert not sub_a.is_alive() and not sub_b.is_alive()


def test_invalidation_keeps_redis_value(host, r):
    a, store_a = host(channel="inval2")
    b, store_b = host(channel="inval2")
    sub = store_b.subscribe(b)
    try:
        b["k"] = "old"
        a["k"] = "new"
        assert _wait_until(lambda: sub.invalidated >= 1)
        assert pickle.loads(r.get("app:k")) == "new"  # dropping B's copy deleted nothing
        assert b["k"] == "new"
    finally:
        sub.stop()
    sub.stop()  # idempotent


def test_messages_from_other_channels_users_are_ignored(host, r):
    b, store_b = host(channel="inval3")
    with store_b.subscribe(b) as sub:
        b["k"] = 1
        r.publish("inval3", b"no separator here")
        a, _ = host(channel="inval3")
        a["other"] = 2  # a real message, after the junk one
        assert _wait_until(lambda: sub.messages >= 1)
        assert b.exists("k") and sub.errors == 0


# ---------------------------------------------------------------- pickling, memoize


def test_from_url_store_pickles_with_the_cache(host, r, redis_socket, cache):
    store = RedisStore.from_url(f"unix://{redis_socket}", prefix="u:", channel="c")
    c = cache(**store.cache_options())
    c["k"] = "v"
    store2 = pickle.loads(pickle.dumps(store))
    assert store2 is not store and store2.origin == store.origin and store2.prefix == b"u:"
    assert store2.read_cb(None, "k") == "v"
    c2 = cache.adopt(pickle.loads(pickle.dumps(c)))  # what a spawn worker gets
    c2["k2"] = "v2"  # written through by the unpickled store
    assert pickle.loads(r.get("u:k2")) == "v2"
    r.set("u:k3", pickle.dumps(3))
    assert c2["k3"] == 3  # and read through

    _, plain = host()
    with pytest.raises(TypeError, match="from_url"):
        pickle.dumps(plain)


def test_memoize_shares_results_between_hosts(host):
    a, _ = host()
    b, _ = host()
    runs = []

    def report(x):
        runs.append(x)
        return {"x": x}

    on_a = a.memoize(namespace="report")(report)
    on_b = b.memoize(namespace="report")(report)
    assert on_a(1) == {"x": 1}
    assert on_b(1) == {"x": 1}  # the generation and the result come through Redis
    assert runs == [1]
    on_b.cache_clear()  # a new generation, written through
    assert on_b(1) == {"x": 1}
    assert runs == [1, 1]
