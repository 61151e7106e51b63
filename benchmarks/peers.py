"""The peers the benchmark compares fastmmap with, one driver class each.

A driver's life in one run (see run.py):

    start()                       once per run: import the client, start a server.
                                  Raises Missing when the peer cannot be had here.
    setup(vk, nprocs, keys)       in the parent: make an empty store and prefill the
                                  working set (every key -> vk.value).
    open_child()                  in each forked worker, before the barrier: sets
                                  self.get(key) and self.set(key, value) to the
                                  callables the timed loop calls.
    close_child()                 in the worker after its loop.
    teardown()                    in the parent after the workloads of one setup.
    stop()                        once per run.

self.get returns None on a miss; self.set returns False when the value was not
stored (anything else counts as stored).  Each peer is driven the way its own
documentation shows: its usual client, its own serializer where it has one
(pickle through the client otherwise), bytes values stored as they are.

Perl's Cache::FastMmap is external: perl_fastmmap.pl runs the timed loop and the
fork/barrier itself and prints the same per-worker records as _worker in run.py.
"""

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


class Missing(Exception):
    """The peer cannot be installed or started on this machine."""


def _version(dist):
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


class Driver:
    key = ""  # short id used in results
    name = ""  # display name
    external = False  # True: runs its own workers (perl)
    shared = True  # False: every process has its own copy (the dict ceiling)
    note = ""

    def __init__(self, workdir):
        self.workdir = workdir
        self.version = None
        self.get = self.set = None

    def start(self):
        pass

    def stop(self):
        pass

    def setup(self, vk, nprocs, keys):
        raise NotImplementedError

    def open_child(self):
        pass

    def close_child(self):
        pass

    def teardown(self):
        pass

    def _path(self, name):
        return os.path.join(self.workdir, name)


def _pickled(get, set_):
    """Wrap a bytes-only client in pickle, the way its users do."""
    loads, dumps = pickle.loads, pickle.dumps

    def pget(k):
        b = get(k)
        return None if b is None else loads(b)

    def pset(k, v):
        return set_(k, dumps(v))

    return pget, pset


# --------------------------------------------------------------------------- fastmmap


class FastmmapDriver(Driver):
    key = "fastmmap"
    name = "fastmmap"
    note = "Cache opened in the parent, used by forked workers"

    def start(self):
        try:
            import fastmmap
        except Exception as e:  # ImportError, or a broken build
            raise Missing("import fastmmap failed: %s: %s" % (type(e).__name__, e)) from None
        self.mod = fastmmap
        self.version = getattr(fastmmap, "__version__", None) or _version("fastmmap")

    def setup(self, vk, nprocs, keys):
        self.path = self._path("fastmmap-%s.cache" % vk.name)
        self.cache = self.mod.Cache(
            self.path, init_file=True, cache_size=vk.cache_size, page_size=vk.page_size
        )
        set_, value = self.cache.set, vk.value
        for k in keys:
            set_(k, value)

    def open_child(self):
        self.get, self.set = self.cache.get, self.cache.set

    def teardown(self):
        self.cache.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


class FastmmapPerlFormatDriver(FastmmapDriver):
    """fastmmap on a Cache::FastMmap-format file (format="perl")."""

    key = "fastmmap-perl"
    name = "fastmmap, format=perl"
    note = ("a Cache::FastMmap-compatible file: Perl's hash, page layout and fcntl locks; "
            "the small dict through a (pickle.dumps, pickle.loads) serializer pair")

    def setup(self, vk, nprocs, keys):
        self.path = self._path("fastmmap-perl-%s.cache" % vk.name)
        self.cache = self.mod.Cache(
            self.path, init_file=True, cache_size=vk.cache_size, page_size=vk.page_size,
            format="perl",
            serializer="raw" if isinstance(vk.value, bytes) else (pickle.dumps, pickle.loads),
        )
        set_, value = self.cache.set, vk.value
        for k in keys:
            set_(k, value)


# --------------------------------------------------------------------------- dict


class DictDriver(Driver):
    key = "dict"
    name = "dict (in-process ceiling)"
    shared = False
    note = "a plain dict; each forked process has its own copy, nothing is shared"

    def start(self):
        self.version = "%d.%d.%d" % sys.version_info[:3]

    def setup(self, vk, nprocs, keys):
        self.d = dict.fromkeys(keys, vk.value)

    def open_child(self):
        self.get, self.set = self.d.get, self.d.__setitem__

    def teardown(self):
        self.d = None


# --------------------------------------------------------------------------- Manager


class ManagerDriver(Driver):
    key = "manager"
    name = "multiprocessing.Manager().dict()"
    note = "one manager process; proxies reconnect in each forked worker"

    def start(self):
        import multiprocessing

        self.mgr = multiprocessing.get_context("fork").Manager()
        self.version = "%d.%d.%d" % sys.version_info[:3]

    def stop(self):
        self.mgr.shutdown()

    def setup(self, vk, nprocs, keys):
        self.d = self.mgr.dict()
        self.d.update(dict.fromkeys(keys, vk.value))

    def open_child(self):
        self.get, self.set = self.d.get, self.d.__setitem__

    def teardown(self):
        self.d = None


# --------------------------------------------------------------------------- diskcache


class DiskcacheDriver(Driver):
    key = "diskcache"
    name = "diskcache.Cache"
    note = "directory on the same tmpfs as fastmmap's file; opened in each worker"

    def start(self):
        try:
            import diskcache
        except ImportError as e:
            raise Missing("pip install diskcache: %s" % e) from None
        self.dc = diskcache
        self.version = _version("diskcache")

    def _open(self, nprocs):
        return self.dc.Cache(self.dir)

    def setup(self, vk, nprocs, keys):
        self.dir = self._path("%s-%s-%d" % (self.key, vk.name, nprocs))
        shutil.rmtree(self.dir, ignore_errors=True)
        self.nprocs = nprocs
        c = self._open(nprocs)
        with c.transact(retry=True):
            for k in keys:
                c.set(k, vk.value, retry=True)
        c.close()

    def open_child(self):
        self.c = self._open(self.nprocs)
        self.get, self.set = self.c.get, self.c.set

    def close_child(self):
        self.c.close()

    def teardown(self):
        shutil.rmtree(self.dir, ignore_errors=True)


class FanoutDriver(DiskcacheDriver):
    key = "fanout"
    name = "diskcache.FanoutCache"
    note = "shards = number of processes (default timeout 0.010 s: a timed-out set returns False)"

    def _open(self, nprocs):
        return self.dc.FanoutCache(self.dir, shards=nprocs)


# --------------------------------------------------------------------------- lmdb


class LmdbDriver(Driver):
    key = "lmdb"
    name = "py-lmdb"
    note = "environment opened after fork, one transaction per operation, sync=False"
    MAP_SIZE = 1 << 30

    def start(self):
        try:
            import lmdb
        except ImportError as e:
            raise Missing("pip install lmdb: %s" % e) from None
        self.lmdb = lmdb
        self.version = "%s (LMDB %s)" % (lmdb.__version__, ".".join(map(str, lmdb.version())))

    def _open(self):
        return self.lmdb.open(self.dir, map_size=self.MAP_SIZE, sync=False)

    def setup(self, vk, nprocs, keys):
        self.dir = self._path("lmdb-%s" % vk.name)
        shutil.rmtree(self.dir, ignore_errors=True)
        value = pickle.dumps(vk.value) if vk.pickled else vk.value
        env = self._open()
        with env.begin(write=True) as txn:
            for k in keys:
                txn.put(k, value)
        env.close()
        self.pickled = vk.pickled

    def open_child(self):
        self.env = env = self._open()
        begin = env.begin

        def get(k):
            with begin() as txn:
                return txn.get(k)

        def set_(k, v):
            with begin(write=True) as txn:
                return txn.put(k, v)

        self.get, self.set = _pickled(get, set_) if self.pickled else (get, set_)

    def close_child(self):
        self.env.close()

    def teardown(self):
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------- servers


def _wait_until(fn, timeout, what):
    end = time.monotonic() + timeout
    err = None
    while time.monotonic() < end:
        try:
            if fn():
                return
        except Exception as e:  # not up yet
            err = e
        time.sleep(0.02)
    raise Missing("%s did not come up in %.0f s (%s)" % (what, timeout, err))


class _ServerDriver(Driver):
    """A peer that needs a server the harness starts (and stops) itself."""

    def _spawn(self, argv):
        self.log = open(self._path(self.key + ".log"), "wb")
        try:
            self.proc = subprocess.Popen(
                argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        except OSError as e:
            raise Missing("cannot run %s: %s" % (argv[0], e)) from None

    def _check_alive(self):
        if self.proc.poll() is not None:
            self.log.flush()
            with open(self.log.name, "rb") as f:
                tail = f.read()[-300:].decode(errors="replace")
            raise Missing("%s exited with %s: %s" % (self.key, self.proc.returncode, tail)) from None

    def stop(self):
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if getattr(self, "log", None):
            self.log.close()


class RedisDriver(_ServerDriver):
    key = "redis"
    name = "Redis (redis-py)"
    note = "redis-server started by the harness, unix socket, persistence off"

    def start(self):
        exe = shutil.which("redis-server")
        if not exe:
            raise Missing("redis-server not found (apt-get install redis-server)") from None
        try:
            import redis
        except ImportError as e:
            raise Missing("pip install redis: %s" % e) from None
        self.redis = redis
        self.sock = self._path("redis.sock")
        self._spawn([exe, "--port", "0", "--unixsocket", self.sock, "--unixsocketperm", "700",
                     "--save", "", "--appendonly", "no", "--dir", self.workdir,
                     "--daemonize", "no"])

        def up():
            self._check_alive()
            return redis.Redis(unix_socket_path=self.sock).ping()

        _wait_until(up, 10, "redis-server")
        info = redis.Redis(unix_socket_path=self.sock).info("server")
        self.version = "redis-py %s, redis-server %s" % (_version("redis"), info.get("redis_version"))

    def setup(self, vk, nprocs, keys):
        r = self.redis.Redis(unix_socket_path=self.sock)
        r.flushall()
        value = pickle.dumps(vk.value) if vk.pickled else vk.value
        for i in range(0, len(keys), 1000):
            r.mset(dict.fromkeys(keys[i:i + 1000], value))
        r.close()
        self.pickled = vk.pickled

    def open_child(self):
        self.r = r = self.redis.Redis(unix_socket_path=self.sock)
        self.get, self.set = _pickled(r.get, r.set) if self.pickled else (r.get, r.set)

    def close_child(self):
        self.r.close()


class MemcachedDriver(_ServerDriver):
    key = "memcached"
    name = "memcached (pymemcache)"
    note = "memcached started by the harness on 127.0.0.1, -m 1024; pickle_serde; sets wait for the reply"

    def start(self):
        exe = shutil.which("memcached")
        if not exe:
            raise Missing("memcached not found (apt-get install memcached)") from None
        try:
            import pymemcache
            from pymemcache import serde
            from pymemcache.client.base import Client
        except ImportError as e:
            raise Missing("pip install pymemcache: %s" % e) from None
        self.Client, self.serde = Client, serde.pickle_serde
        with socket.socket() as s:  # a free loopback port
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        argv = [exe, "-l", "127.0.0.1", "-p", str(self.port), "-U", "0", "-m", "1024", "-t", "2",
                "-c", "1024"]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]  # memcached refuses to run as root
        self._spawn(argv)

        def up():
            self._check_alive()
            return self._client().version()

        _wait_until(up, 10, "memcached")
        self.version = "pymemcache %s, memcached %s" % (
            pymemcache.__version__, self._client().version().decode())

    def _client(self):
        # default_noreply=False: a set waits for memcached's answer, as every other
        # peer's set does (pymemcache's default fires and forgets).
        return self.Client(("127.0.0.1", self.port), serde=self.serde, default_noreply=False,
                           no_delay=True)

    def setup(self, vk, nprocs, keys):
        c = self._client()
        c.flush_all()
        for i in range(0, len(keys), 1000):
            failed = c.set_many(dict.fromkeys(keys[i:i + 1000], vk.value))
            if failed:
                raise RuntimeError("memcached prefill failed for %d keys" % len(failed))
        c.close()

    def open_child(self):
        self.c = c = self._client()
        self.get, self.set = c.get, c.set

    def close_child(self):
        self.c.close()


# --------------------------------------------------------------------------- Perl


class PerlDriver(Driver):
    """Perl's Cache::FastMmap; perl_fastmmap.pl forks and times its own workers."""

    key = "perl"
    name = "Cache::FastMmap (Perl)"
    external = True
    note = "raw_values; the small dict goes through Storable; the Perl script times its own loop"
    SCRIPT = os.path.join(HERE, "perl_fastmmap.pl")

    def start(self):
        self.perl = shutil.which("perl")
        if not self.perl:
            raise Missing("perl not found") from None
        p = subprocess.run([self.perl, "-MCache::FastMmap", "-MJSON::PP", "-MTime::HiRes",
                            "-e", "print $Cache::FastMmap::VERSION"],
                           capture_output=True, text=True)
        if p.returncode:
            raise Missing("Cache::FastMmap not installed (apt-get install "
                          "libcache-fastmmap-perl): %s" % p.stderr.strip()[:200]) from None
        self.version = p.stdout.strip()

    def call(self, cfg, timeout):
        """Run perl_fastmmap.pl with cfg (a dict, sent as JSON) and return its JSON."""
        cfg = dict(cfg, tmpdir=tempfile.mkdtemp(prefix="perl-", dir=self.workdir))
        try:
            p = subprocess.run([self.perl, self.SCRIPT], input=json.dumps(cfg),
                               capture_output=True, text=True, timeout=timeout)
        finally:
            shutil.rmtree(cfg["tmpdir"], ignore_errors=True)
        if p.returncode:
            raise RuntimeError("perl_fastmmap.pl exited %d: %s" % (p.returncode, p.stderr[-500:]))
        return json.loads(p.stdout)


ALL = [FastmmapDriver, FastmmapPerlFormatDriver, PerlDriver, DiskcacheDriver, FanoutDriver, LmdbDriver, RedisDriver,
       MemcachedDriver, ManagerDriver, DictDriver]
