"""Memoize functions in a fastmmap cache: the machinery behind Cache.memoize().

Every process that shares the cache file shares the memoized results::

    @cache.memoize(expire_time="10m")
    def report(year, month):
        ...

How it works, so that its costs are clear:

- A call is looked up under a key made of the function's namespace
  (``module.qualname``), the function's current *generation* and a
  blake2b hash of its arguments, normalised first with
  ``inspect.signature(func).bind()`` and ``apply_defaults()`` (so
  ``f(1)``, ``f(1, 2)`` and ``f(a=1)`` are one call when ``b`` defaults to
  2) and then pickled in a canonical form (dicts and sets sorted, classes
  by name, no pickle memo).  ``self`` and ``cls`` are arguments like the
  others: an instance is hashed by its pickled state.  Arguments that
  cannot be pickled (locks, connections, lambdas) raise TypeError: pass
  ``key=``, which replaces the hash with the caller's own string.
- The generation is a random token kept in the cache under a key of its
  own, read on every call.  ``wrapper.cache_clear()`` stores a new token:
  the old entries can no longer be found (O(1), whatever their number) and
  leave the cache by LRU eviction or expiry.  If the generation entry itself
  is ever evicted, a new token is made, which only clears the function
  again: stale results are never revived.
- ``None`` results are cached like any other (the lookup uses a private
  default, so a cached ``None`` is told apart from a miss).  Exceptions
  are not cached.
- Stampede protection: on a miss, the caller that wins
  ``cache.add(lock_key, token, expire_time=stampede_timeout)`` (atomic:
  one winner, in any thread or process) computes the value; the others poll
  with a short backoff until the value appears, then return it.  If the
  lock disappears without a value (the winner raised: its exception
  propagates to it alone), a waiter takes the lock and computes.  A waiter
  that has waited ``stampede_timeout`` seconds (default 60) computes
  without the lock; the lock entry also expires after that time, so a
  winner that was killed blocks nobody for longer.  ``stampede_timeout=0``
  turns the protection off.

The keys are ordinary cache entries: on a cache with ``read_cb`` /
``write_cb`` (a RedisStore, say) they go through the callbacks like any
other key, and the values through the cache's serializer.
"""

from __future__ import annotations

import datetime
import functools
import io
import math
import os
import pickle
import threading
import time

from . import _options

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from typing import Any

    from . import Cache

__all__ = ["memoize", "DEFAULT_STAMPEDE_TIMEOUT"]

#: How long waiters wait for the process computing a value (seconds).
DEFAULT_STAMPEDE_TIMEOUT = 60.0

# Key prefixes: results, stampede locks, generations.  They differ before
# the first ":", so the three kinds can never collide.
_VALUE_PREFIX = "fmm.memo:"
_LOCK_PREFIX = "fmm.memo-lock:"
_GEN_PREFIX = "fmm.memo-gen:"

# Waiters poll with a backoff from _FIRST_DELAY up to _MAX_DELAY seconds.
_FIRST_DELAY = 0.005
_MAX_DELAY = 0.1

_MISS = object()  # cache.get default: tells a miss from a cached None
_WAIT = object()  # poll(): the value is still being computed
_RETRY = object()  # poll(): the lock vanished without a value

_PICKLE_PROTOCOL = 4  # fixed, so keys do not change with the default protocol


# ---------------------------------------------------------------- argument hashing


class _Dict(tuple):  # type: ignore[type-arg]
    """Canonical form of a dict: its items sorted by their pickled keys."""

    __slots__ = ()


class _Set(tuple):  # type: ignore[type-arg]
    """Canonical form of a set or frozenset: its elements sorted by pickle."""

    __slots__ = ()


def _name_ref(module: str, qualname: str) -> str:
    return f"{module}.{qualname}"


class _KeyPickler(pickle.Pickler):
    """A pickler for hashing, never for loading.

    Classes are written as their module.qualname, so instances of local
    classes hash too (functions are pickled by reference as usual: a lambda
    or a local function cannot be told apart from another one with the same
    name, so it is refused).  The memo is off (``fast``), so equal arguments
    give equal bytes whether or not they are the same objects.
    """

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, type):
            module = getattr(obj, "__module__", None) or "?"
            if module == "__mp_main__":
                module = "__main__"
            return _name_ref, (module, obj.__qualname__)
        return NotImplemented


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    p = _KeyPickler(buf, _PICKLE_PROTOCOL)
    p.fast = True  # no memo: the bytes depend only on the values
    p.dump(obj)
    return buf.getvalue()


def _canon(obj: Any) -> Any:
    """Equal dicts and sets give equal pickles, whatever their order."""
    t = type(obj)
    if t is str or t is int or t is bytes or t is float or t is bool or obj is None:
        return obj
    if t is tuple:
        return tuple(_canon(x) for x in obj)
    if t is list:
        return [_canon(x) for x in obj]
    if t is dict:
        items = [(_canon(k), _canon(v)) for k, v in obj.items()]
        return _Dict(sorted(items, key=lambda kv: _dumps(kv[0])))
    if t is set or t is frozenset:
        return _Set(sorted((_canon(x) for x in obj), key=_dumps))
    return obj


def _namespace_of(func: Callable[..., Any]) -> str:
    module = getattr(func, "__module__", None) or "?"
    if module == "__mp_main__":  # a spawn child's view of __main__
        module = "__main__"
    return f"{module}.{getattr(func, '__qualname__', getattr(func, '__name__', repr(func)))}"


# ---------------------------------------------------------------- the shared protocol


class _Memo:
    """The cache side of one memoized function, shared by its sync and async wrappers."""

    def __init__(
        self,
        cache: Cache,
        func: Callable[..., Any],
        expire_time: Any,
        key: Callable[..., str] | None,
        stampede_timeout: float,
        namespace: str,
    ) -> None:
        self.cache = cache
        self.func = func
        self.expire_time = expire_time
        self.key_fn = key
        self.timeout = stampede_timeout
        self.namespace = namespace
        self.gen_key = _GEN_PREFIX + namespace
        # inspect and hashlib are imported here, when a function is
        # decorated, not with fastmmap: `import fastmmap` stays cheap for
        # programs that never memoize.
        import hashlib
        import inspect

        self.blake2b = hashlib.blake2b
        try:
            self.sig: inspect.Signature | None = inspect.signature(func)
        except (TypeError, ValueError):  # some builtins have none
            self.sig = None
        #: the **kwargs parameter's name, whose dict is keyed sorted
        self.var_kw = (
            {n for n, p in self.sig.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD}
            if self.sig is not None
            else set()
        )

    # -- keys

    def generation(self) -> str:
        cache = self.cache
        gen = cache.get(self.gen_key)
        if isinstance(gen, bytes):
            gen = gen.decode("ascii", "replace")
        if isinstance(gen, str) and gen:
            return gen
        new = os.urandom(8).hex()
        if cache.add(self.gen_key, new, expire_time=0):  # never expires
            return new
        gen = cache.get(self.gen_key)
        if isinstance(gen, bytes):
            gen = gen.decode("ascii", "replace")
        return gen if isinstance(gen, str) and gen else new

    def clear(self) -> None:
        self.cache.set(self.gen_key, os.urandom(8).hex(), expire_time=0)

    def key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """The cache key of a call; None if the arguments do not bind (func will raise)."""
        if self.key_fn is not None:
            user_key = self.key_fn(*args, **kwargs)
            if not isinstance(user_key, str):
                raise TypeError(
                    f"memoize key= function must return a str, got {type(user_key).__name__}"
                )
            return f"{_VALUE_PREFIX}{self.namespace}:{self.generation()}:{user_key}"
        if self.sig is not None:
            try:
                bound = self.sig.bind(*args, **kwargs)
            except TypeError:
                return None
            bound.apply_defaults()
            var_kw = self.var_kw
            normal: list[Any] = []
            for name, value in bound.arguments.items():
                if name in var_kw:
                    value = sorted(value.items())
                normal.append((name, value))
            call: Any = tuple(normal)
        else:
            call = (args, sorted(kwargs.items()))
        gen = self.generation()
        try:
            payload = _dumps((self.namespace, gen, _canon(call)))
        except Exception as e:
            raise TypeError(
                f"memoize cannot hash the arguments of {self.namespace} ({e}); "
                "pass key=lambda *args, **kwargs: ... returning a str"
            ) from e
        digest = self.blake2b(payload, digest_size=20).hexdigest()
        return f"{_VALUE_PREFIX}{self.namespace}:{gen}:{digest}"

    @staticmethod
    def lock_key(key: str) -> str:
        return _LOCK_PREFIX + key[len(_VALUE_PREFIX):]

    # -- values and locks

    def lookup(self, key: str) -> Any:
        return self.cache.get(key, _MISS)

    def store(self, key: str, value: Any) -> None:
        # False (too big for a page) is fine: the value is returned uncached.
        self.cache.set(key, value, self.expire_time)

    def acquire(self, key: str) -> str | None:
        """Take the stampede lock of key: a token, or None if another caller holds it."""
        token = f"{os.getpid()}.{threading.get_ident()}.{os.urandom(6).hex()}"
        if self.cache.add(self.lock_key(key), token, expire_time=math.ceil(self.timeout)):
            return token
        return None

    def release(self, key: str, token: str, quiet: bool = False) -> None:
        """Remove the lock if it is still ours (it may have expired and been retaken)."""
        try:
            with self.cache.lock(self.lock_key(key)) as entry:
                if entry.value == token:
                    entry.remove()
        except Exception:
            if not quiet:  # an exception of the caller's own is already on its way
                raise

    def poll(self, key: str) -> Any:
        """The value if it has appeared, else _RETRY if the lock is gone, else _WAIT.

        Uses exists() first: it calls no read_cb, so polling stays local.
        """
        cache = self.cache
        if cache.exists(key):
            value = cache.get(key, _MISS)
            if value is not _MISS:
                return value
        if not cache.exists(self.lock_key(key)):
            return _RETRY
        return _WAIT


def _next_delay(delay: float) -> float:
    return min(delay * 1.5, _MAX_DELAY)


def _jitter(delay: float) -> float:
    import random  # only callers that wait for another's computation get here

    return delay * random.uniform(0.75, 1.25)


# ---------------------------------------------------------------- wrappers


def _sync_wrapper(memo: _Memo) -> Callable[..., Any]:
    func = memo.func

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        key = memo.key(args, kwargs)
        if key is None:
            return func(*args, **kwargs)  # raises the binding TypeError
        value = memo.lookup(key)
        if value is not _MISS:
            return value
        if memo.timeout <= 0:
            value = func(*args, **kwargs)
            memo.store(key, value)
            return value
        deadline = time.monotonic() + memo.timeout
        delay = _FIRST_DELAY
        while True:
            token = memo.acquire(key)
            if token is not None:
                try:
                    value = memo.lookup(key)  # stored while we were not looking?
                    if value is _MISS:
                        value = func(*args, **kwargs)
                        memo.store(key, value)
                except BaseException:
                    memo.release(key, token, quiet=True)
                    raise
                memo.release(key, token)
                return value
            while True:  # another caller computes it: wait for the value
                if time.monotonic() >= deadline:
                    value = func(*args, **kwargs)
                    memo.store(key, value)
                    return value
                time.sleep(_jitter(delay))
                delay = _next_delay(delay)
                state = memo.poll(key)
                if state is _RETRY:
                    break
                if state is not _WAIT:
                    return state

    return wrapper


def _async_wrapper(memo: _Memo) -> Callable[..., Awaitable[Any]]:
    # asyncio is imported when a coroutine function is decorated (it would
    # be most of `import fastmmap`'s time); the sync wrapper never needs it.
    import asyncio

    func = memo.func

    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        key = memo.key(args, kwargs)
        if key is None:
            return await func(*args, **kwargs)
        value = memo.lookup(key)
        if value is not _MISS:
            return value
        if memo.timeout <= 0:
            value = await func(*args, **kwargs)
            memo.store(key, value)
            return value
        deadline = time.monotonic() + memo.timeout
        delay = _FIRST_DELAY
        while True:
            token = memo.acquire(key)
            if token is not None:
                try:
                    value = memo.lookup(key)
                    if value is _MISS:
                        value = await func(*args, **kwargs)
                        memo.store(key, value)
                except BaseException:  # CancelledError included
                    memo.release(key, token, quiet=True)
                    raise
                memo.release(key, token)
                return value
            while True:
                if time.monotonic() >= deadline:
                    value = await func(*args, **kwargs)
                    memo.store(key, value)
                    return value
                await asyncio.sleep(_jitter(delay))
                delay = _next_delay(delay)
                state = memo.poll(key)
                if state is _RETRY:
                    break
                if state is not _WAIT:
                    return state

    return wrapper


def _decorate(
    cache: Cache,
    func: Any,
    expire_time: Any,
    key: Callable[..., str] | None,
    stampede_timeout: float,
    namespace: str | None,
) -> Any:
    # Stacked on top of @staticmethod / @classmethod: memoize the function
    # inside and wrap it again, so either order works.
    if isinstance(func, (staticmethod, classmethod)):
        inner = _decorate(cache, func.__func__, expire_time, key, stampede_timeout, namespace)
        return type(func)(inner)
    if not callable(func):
        raise TypeError(f"memoize needs a function, got {type(func).__name__}")
    memo = _Memo(cache, func, expire_time, key, stampede_timeout, namespace or _namespace_of(func))
    import inspect

    if inspect.iscoroutinefunction(func):
        wrapper = _async_wrapper(memo)
    else:
        wrapper = _sync_wrapper(memo)

    def cache_clear() -> None:
        """Forget every cached result of this function, in every process (O(1))."""
        memo.clear()

    def cache_key(*args: Any, **kwargs: Any) -> str:
        """The cache key of the call func(*args, **kwargs) in the current generation."""
        k = memo.key(args, kwargs)
        if k is None:
            raise TypeError(f"arguments do not match the signature of {memo.namespace}")
        return k

    w: Any = wrapper
    w.cache_clear = cache_clear
    w.cache_key = cache_key
    w.cache = cache
    return wrapper


def memoize(
    cache: Cache,
    expire_time: Any = None,
    key: Callable[..., str] | None = None,
    *,
    stampede_timeout: float = DEFAULT_STAMPEDE_TIMEOUT,
    namespace: str | None = None,
) -> Any:
    """Return a decorator that memoizes a function in cache (see Cache.memoize).

    ``expire_time``: lifetime of each result (None: the cache's default).
    ``key``: a callable(*args, **kwargs) -> str replacing the argument hash.
    ``stampede_timeout``: seconds a caller waits for another one computing
    the same value before computing it itself (0: no stampede protection).
    ``namespace``: replaces ``module.qualname`` in the keys (no ":").
    """
    func: Any = None
    if isinstance(expire_time, (staticmethod, classmethod)) or (
        callable(expire_time) and not isinstance(expire_time, (int, float, str, datetime.timedelta))
    ):
        func, expire_time = expire_time, None  # bare @cache.memoize, no parentheses
    if expire_time is not None:
        _options.parse_expire_time(expire_time)  # fail now, not at the first call
    if key is not None and not callable(key):
        raise TypeError(f"memoize key= must be a callable returning a str, got {type(key).__name__}")
    if isinstance(stampede_timeout, bool) or not isinstance(stampede_timeout, (int, float)):
        raise TypeError(f"stampede_timeout must be a number of seconds, got {stampede_timeout!r}")
    if not 0 <= stampede_timeout <= _options.MAX_EXPIRE_TIME:
        raise ValueError(f"stampede_timeout must be >= 0 seconds, got {stampede_timeout!r}")
    if namespace is not None and (not isinstance(namespace, str) or ":" in namespace or not namespace):
        raise ValueError(f"namespace must be a non-empty str without ':', got {namespace!r}")
    if func is not None:
        return _decorate(cache, func, None, key, float(stampede_timeout), namespace)

    def decorator(func: Any) -> Any:
        return _decorate(cache, func, expire_time, key, float(stampede_timeout), namespace)

    return decorator
