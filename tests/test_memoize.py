"""Cache.memoize(): keys, methods, async, cache_clear, expiry and stampede protection."""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import threading
import time

import pytest

import fastmmap
from fastmmap import _memoize

pytestmark = pytest.mark.timeout(60)

T0 = 1_900_000_000  # a fixed "now" for _set_time_override


class Counter:
    """Counts calls in this process."""

    def __init__(self):
        self.n = 0
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            self.n += 1


class RunLog:
    """Counts calls across processes: one line per run, appended with O_APPEND."""

    def __init__(self, path):
        self.path = str(path)

    def record(self, what="run"):
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, f"{os.getpid()} {what}\n".encode())
        finally:
            os.close(fd)

    def runs(self):
        try:
            with open(self.path) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []


# ---------------------------------------------------------------- basics


def test_caches_results_and_keeps_metadata(cache):
    c = cache()
    calls = Counter()

    def add(a, b=2, *rest, scale=1, **extra):
        """Add things."""
        calls()
        return (a + b + sum(rest)) * scale

    m = c.memoize()(add)
    assert m.__wrapped__ is add
    assert m.__name__ == "add" and m.__doc__ == "Add things." and m.__qualname__ == add.__qualname__
    assert inspect.signature(m) == inspect.signature(add)
    assert m(1) == 3 and calls.n == 1
    # one call, however it is spelled (bind + apply_defaults)
    assert m(1, 2) == 3 and m(a=1) == 3 and m(b=2, a=1) == 3 and m(1, scale=1) == 3
    assert calls.n == 1
    assert m(1, 3) == 4 and calls.n == 2
    assert m(1, 2, 3, scale=2) == 12 and calls.n == 3
    # **kwargs order does not matter
    assert m(1, x=1, y=2) == 3 and m(1, y=2, x=1) == 3 and calls.n == 4
    with pytest.raises(TypeError):
        m()  # the function's own binding error, not a cache error


def test_bare_decorator_and_cache_key(cache):
    c = cache()

    @c.memoize
    def double(x):
        return 2 * x

    assert double(4) == 8
    k = double.cache_key(4)
    assert k.startswith("fmm.memo:") and f"{__name__}.test_bare_decorator_and_cache_key" in k
    assert c[k] == 8
    assert double.cache_key(x=4) == k and double.cache_key(5) != k
    assert double.cache is c


def test_none_results_are_cached(cache):
    c = cache()
    calls = Counter()

    @c.memoize()
    def nothing(x):
        calls()
        return None

    assert nothing(1) is None and nothing(1) is None and nothing(1) is None
    assert calls.n == 1
    assert c.exists(nothing.cache_key(1))


def test_exceptions_are_not_cached(cache):
    c = cache()
    calls = Counter()

    @c.memoize()
    def flaky(x):
        calls()
        if calls.n == 1:
            raise RuntimeError("first call fails")
        return x

    with pytest.raises(RuntimeError):
        flaky(1)
    assert flaky(1) == 1 and flaky(1) == 1
    assert calls.n == 2
    assert not c.exists(_memoize._Memo.lock_key(flaky.cache_key(1)))  # lock released


def test_equal_containers_give_one_key(cache):
    c = cache()

    @c.memoize()
    def f(x):
        return x

    assert f.cache_key({"a": 1, "b": 2}) == f.cache_key({"b": 2, "a": 1})
    assert f.cache_key({3, 1, 2}) == f.cache_key({1, 2, 3})
    assert f.cache_key([1, "a"]) == f.cache_key([1, "a"])
    s = "x" * 50
    assert f.cache_key((s, s)) == f.cache_key((s, "".join(["x"] * 50)))  # identity does not matter
    # different types or values, different keys
    keys = {f.cache_key(v) for v in (1, 1.5, "1", b"1", (1,), [1], {1}, frozenset({2}), None, {1: 1})}
    assert len(keys) == 10


def test_unhashable_arguments_ask_for_key(cache):
    c = cache()

    @c.memoize()
    def f(x):
        return 1

    with pytest.raises(TypeError, match="key="):
        f(threading.Lock())
    with pytest.raises(TypeError, match="key="):
        f(lambda: 1)  # a lambda cannot be told from another one


def test_key_function(cache):
    c = cache()
    calls = Counter()

    @c.memoize(key=lambda user, conn: f"user:{user}")
    def load(user, conn):
        calls()
        return {"user": user}

    lock = threading.Lock()  # unpicklable, but the key function ignores it
    assert load(1, lock) == {"user": 1} and load(1, object()) == {"user": 1}
    assert calls.n == 1
    assert load.cache_key(1, None).endswith(":user:1")

    @c.memoize(key=lambda x: x)
    def bad(x):
        return x

    with pytest.raises(TypeError, match="str"):
        bad(1)


def test_options_are_checked_at_decoration(cache):
    c = cache()
    with pytest.raises(ValueError):
        c.memoize(expire_time="soon")
    with pytest.raises(ValueError):
        c.memoize(stampede_timeout=-1)
    with pytest.raises(TypeError):
        c.memoize(stampede_timeout="1")
    with pytest.raises(ValueError):
        c.memoize(namespace="a:b")
    with pytest.raises(TypeError):
        c.memoize(key="not callable")
    with pytest.raises(TypeError):
        c.memoize()(42)


def test_too_big_results_are_returned_uncached(cache):
    c = cache(page_size="4k", num_pages=3)
    calls = Counter()

    @c.memoize()
    def big(n):
        calls()
        return os.urandom(n)

    assert len(big(10_000)) == 10_000 and len(big(10_000)) == 10_000
    assert calls.n == 2
    assert len(big(10)) == 10 and big(10) == big(10) and calls.n == 3


def test_json_cache(cache):
    c = cache(serializer="json")

    @c.memoize()
    def f(x):
        return {"x": x, "t": (1, 2)}

    assert f(1) == {"x": 1, "t": (1, 2)}  # the first call returns the function's value
    assert f(1) == {"x": 1, "t": [1, 2]}  # later ones what JSON kept


# ---------------------------------------------------------------- methods


def test_methods_and_decorator_order(cache):
    c = cache()
    runs = []

    class Shop:
        def __init__(self, rate):
            self.rate = rate

        @c.memoize()
        def price(self, amount):
            """Price with tax."""
            runs.append(("price", self.rate, amount))
            return amount * self.rate

        @c.memoize()
        @staticmethod
        def static_below(x):
            runs.append(("static_below", x))
            return x + 1

        @staticmethod
        @c.memoize()
        def static_above(x):
            runs.append(("static_above", x))
            return x + 2

        @c.memoize
        @classmethod
        def class_below(cls, x):
            runs.append(("class_below", cls.__name__, x))
            return (cls.__name__, x)

        @classmethod
        @c.memoize
        def class_above(cls, x):
            runs.append(("class_above", cls.__name__, x))
            return (cls.__name__, x * 2)

    class SubShop(Shop):
        pass

    a, b, a2 = Shop(2), Shop(3), Shop(2)
    assert a.price(10) == 20 and b.price(10) == 30
    assert a2.price(10) == 20  # equal state: the same key
    assert a.price(10) == 20
    assert runs.count(("price", 2, 10)) == 1 and runs.count(("price", 3, 10)) == 1
    assert Shop.price.__doc__ == "Price with tax."
    assert inspect.signature(Shop.price) == inspect.signature(Shop.price.__wrapped__)

    for _ in range(2):
        assert Shop.static_below(1) == 2 and Shop(5).static_below(1) == 2
        assert Shop.static_above(1) == 3
        assert Shop.class_below(1) == ("Shop", 1) and SubShop.class_below(1) == ("SubShop", 1)
        assert Shop.class_above(1) == ("Shop", 2) and SubShop.class_above(1) == ("SubShop", 2)
    assert len(runs) == 2 + 2 + 4  # each distinct call ran once
    assert isinstance(Shop.__dict__["static_below"], staticmethod)
    assert isinstance(Shop.__dict__["class_below"], classmethod)
    Shop.class_below.cache_clear()
    Shop.static_above.cache_clear()
    assert Shop.class_below(1) == ("Shop", 1) and Shop.static_above(1) == 3
    assert len(runs) == 10


# ---------------------------------------------------------------- cache_clear, expiry


def test_cache_clear_is_per_function(cache):
    c = cache()
    fc, gc = Counter(), Counter()

    @c.memoize()
    def f(x):
        fc()
        return x

    @c.memoize()
    def g(x):
        gc()
        return x

    for i in range(20):
        f(i), g(i)
    n_entries = len(c)
    f.cache_clear()
    for i in range(20):
        f(i), g(i)
    assert fc.n == 40 and gc.n == 20
    assert len(c) == n_entries + 20  # the old results stay until evicted or expired


def test_cache_clear_reaches_other_processes(cache, forked, tmp_path):
    c = cache()
    log = RunLog(tmp_path / "runs")

    @c.memoize()
    def f(x):
        log.record()
        return x * 10

    assert f(1) == 10
    assert forked(lambda: f(1)) == 10  # a forked child finds it
    assert len(log.runs()) == 1
    forked(f.cache_clear)
    assert f(1) == 10
    assert len(log.runs()) == 2


def test_lost_generation_never_revives_old_results(cache):
    c = cache()
    calls = Counter()

    @c.memoize()
    def f(x):
        calls()
        return calls.n

    assert f(1) == 1
    f.cache_clear()
    assert f(1) == 2
    gen_key = _memoize._GEN_PREFIX + _memoize._namespace_of(f.__wrapped__)
    assert c.remove(gen_key)  # as if evicted
    assert f(1) == 3  # a fresh generation: neither 1 nor 2 comes back
    assert f(1) == 3


def test_expiry(cache):
    c = cache()
    c._set_time_override(T0)
    calls = Counter()

    @c.memoize(expire_time=10)
    def f(x):
        calls()
        return calls.n

    @c.memoize()  # the cache's default: never
    def g(x):
        calls()
        return "g"

    assert f(1) == 1 and g(1) == "g"
    c._set_time_override(T0 + 9)
    assert f(1) == 1
    c._set_time_override(T0 + 11)
    assert f(1) == 3 and g(1) == "g"
    assert calls.n == 3


def test_cache_default_expiry(cache):
    c = cache(expire_time="1m")
    c._set_time_override(T0)
    calls = Counter()

    @c.memoize()
    def f():
        calls()

    f()
    c._set_time_override(T0 + 59)
    f()
    c._set_time_override(T0 + 61)
    f()
    assert calls.n == 2


# ---------------------------------------------------------------- stampede protection


def _slow(log, seconds):
    def compute(x):
        log.record()
        time.sleep(seconds)
        return (x, os.getpid(), os.urandom(8).hex())  # unique to this run

    return compute


def test_stampede_forked_processes_compute_once(cache, forked, tmp_path):
    c = cache()
    log = RunLog(tmp_path / "runs")
    f = c.memoize()(_slow(log, 0.5))
    rfd, wfd = os.pipe()

    def child():
        os.read(rfd, 1)  # the start signal: all children start together
        return f("same")

    children = [forked.start(child) for _ in range(8)]
    os.write(wfd, b"x" * 8)
    results = [ch.result(timeout=60) for ch in children]
    os.close(rfd)
    os.close(wfd)
    assert len(log.runs()) == 1, log.runs()
    assert len(set(results)) == 1
    assert results[0][0] == "same" and results[0][1] in {ch.pid for ch in children}
    assert f("same") == results[0]


def test_stampede_threads_compute_once(cache, tmp_path):
    c = cache()
    log = RunLog(tmp_path / "runs")
    f = c.memoize()(_slow(log, 0.3))
    barrier = threading.Barrier(8)
    results = []

    def worker():
        barrier.wait()
        results.append(f("k"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 8 and len(set(results)) == 1
    assert len(log.runs()) == 1


def test_stampede_winner_exception_then_a_waiter_computes(cache):
    c = cache()
    calls = Counter()

    @c.memoize()
    def f(x):
        calls()
        n = calls.n
        time.sleep(0.3)
        if n == 1:
            raise RuntimeError("the first run fails")
        return n

    barrier = threading.Barrier(4)
    outcomes = []

    def worker():
        barrier.wait()
        try:
            outcomes.append(f(1))
        except RuntimeError as e:
            outcomes.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    errors = [o for o in outcomes if isinstance(o, RuntimeError)]
    assert len(errors) == 1  # only the caller that ran it sees its exception
    assert sorted(o for o in outcomes if not isinstance(o, RuntimeError)) == [2, 2, 2]
    assert calls.n == 2


def test_stampede_timeout_then_compute_anyway(cache):
    c = cache()
    calls = Counter()

    @c.memoize(stampede_timeout=0.3)
    def f(x):
        calls()
        return "computed"

    # a lock whose owner never finishes (a killed process, say)
    assert c.add(_memoize._Memo.lock_key(f.cache_key(1)), "ghost", expire_time=60)
    assert f(1) == "computed"
    assert calls.n == 1
    assert f(1) == "computed" and calls.n == 1  # and it was stored


def test_stampede_protection_off(cache):
    c = cache()

    @c.memoize(stampede_timeout=0)
    def f(x):
        return x

    assert c.add(_memoize._Memo.lock_key(f.cache_key(1)), "ghost", expire_time=60)
    assert f(1) == 1  # does not wait for the lock


# ---------------------------------------------------------------- async


def test_async_gather_runs_once(cache):
    c = cache()
    calls = Counter()

    @c.memoize(expire_time="1m")
    async def fetch(url, timeout=5):
        """Fetch."""
        calls()
        await asyncio.sleep(0.3)
        return {"url": url, "token": os.urandom(4).hex()}

    assert inspect.iscoroutinefunction(fetch)
    assert inspect.signature(fetch) == inspect.signature(fetch.__wrapped__)
    assert fetch.__doc__ == "Fetch."

    async def main():
        first = await asyncio.gather(*[fetch("a") for _ in range(5)])
        again = await fetch("a", timeout=5)
        other = await fetch("b")
        return first, again, other

    first, again, other = asyncio.run(main())
    assert all(r == first[0] for r in first) and again == first[0]
    assert other["url"] == "b"
    assert calls.n == 2


def test_async_exception_and_clear(cache):
    c = cache()
    calls = Counter()

    @c.memoize()
    async def f(x):
        calls()
        await asyncio.sleep(0.05)
        if calls.n == 1:
            raise ValueError("boom")
        return calls.n

    async def main():
        out = await asyncio.gather(*[f(1) for _ in range(3)], return_exceptions=True)
        return out

    out = asyncio.run(main())
    assert sum(isinstance(o, ValueError) for o in out) == 1
    assert [o for o in out if not isinstance(o, ValueError)] == [2, 2]
    f.cache_clear()
    assert asyncio.run(f(1)) == 3
    assert calls.n == 3


def test_async_methods(cache):
    c = cache()

    class Client:
        def __init__(self, base):
            self.base = base

        @c.memoize()
        async def get(self, path):
            await asyncio.sleep(0)
            return self.base + path

        @c.memoize()
        @staticmethod
        async def ping():
            return "pong"

    assert asyncio.run(Client("x/").get("p")) == "x/p"
    assert asyncio.run(Client("y/").get("p")) == "y/p"
    assert asyncio.run(Client.ping()) == "pong"
    assert inspect.iscoroutinefunction(Client.get)


def test_wraps_like_functools(cache):
    c = cache()

    def f(a, /, b, *, c=3):
        pass

    m = c.memoize()(f)
    ref = functools.wraps(f)(lambda *a, **k: None)
    for attr in ("__module__", "__name__", "__qualname__", "__doc__", "__wrapped__"):
        assert getattr(m, attr) == getattr(ref, attr)
    assert str(inspect.signature(m)) == "(a, /, b, *, c=3)"
