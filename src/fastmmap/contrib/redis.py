"""Redis as the second level behind a fastmmap cache.

A fastmmap cache is shared by the processes of one host; a Redis server is
shared by the hosts.  ``RedisStore`` provides the three fastmmap callbacks
so that a host's cache reads through, writes through (or writes back) to
Redis::

    import redis
    import fastmmap
    from fastmmap.contrib.redis import RedisStore

    store = RedisStore(redis.Redis(), prefix="app:")
    cache = fastmmap.Cache("/dev/shm/app.cache", expire_time="5m", **store.cache_options())

- ``read_cb(context, key)``: ``GET prefix+key``; the value is decoded with
  the store's serializer, and a key that is absent gives ``None`` (fastmmap's
  "not found").
- ``write_cb(context, key, value, expire_on)``: ``SET prefix+key`` with
  ``PXAT`` at ``expire_on`` (absolute unix seconds; 0 = no expiry).  An
  ``expire_on`` already in the past deletes the key instead.
- ``delete_cb(context, key)``: ``DEL prefix+key``.

Cross-host invalidation is optional: with ``channel=...`` every write and
delete also ``PUBLISH``-es the key there, tagged with the store's
``origin``; ``store.subscribe(cache)`` starts (explicitly: the store never
starts a thread by itself) one thread that removes the keys other hosts
changed from the local cache with ``cache.get_and_remove()``, which calls
no callbacks, so nothing is deleted from Redis.  The next read of such a
key reads the new value through from Redis.

This module needs the ``redis`` package (redis-py); it never imports it
unless ``RedisStore.from_url`` is used.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import threading
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from fastmmap import Cache

__all__ = ["RedisStore", "Subscription"]

_SEP = b"\x00"  # between the origin and the key in an invalidation message
_MISSING = object()


def _json_dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _pickle_dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)


def _as_bytes(key: str | bytes) -> bytes:
    if isinstance(key, bytes):
        return key
    if isinstance(key, str):
        return key.encode("utf-8", "surrogatepass")  # as fastmmap encodes str keys
    raise TypeError(f"keys are str or bytes, not {type(key).__name__}")


class RedisStore:
    """fastmmap callbacks that keep the cache's entries in Redis.

    ``client``: a ``redis.Redis`` client (``decode_responses`` must stay
    false for the pickle serializer).  ``prefix``: prepended to every key in
    Redis (str or bytes).  ``serializer``: how values are stored in Redis:
    ``"pickle"`` (the default: any picklable object, types kept; only for a
    Redis that only trusted code can write), ``"json"`` or a ``(dumps,
    loads)`` pair (``dumps`` returns bytes or str, ``loads`` gets bytes).
    ``channel``: a Redis pub/sub channel for cross-host invalidation (None:
    no messages).  ``origin``: this host's id in those messages (default: a
    random id made when the store is created, so create the store before
    forking, or pass the same origin in every process of a host).
    """

    def __init__(
        self,
        client: Any,
        prefix: str | bytes = "",
        serializer: Any = "pickle",
        channel: str | bytes | None = None,
        *,
        origin: str | None = None,
    ) -> None:
        self.client = client
        self.prefix = _as_bytes(prefix)
        if serializer == "pickle":
            self._dumps: Callable[[Any], bytes | str] = _pickle_dumps
            self._loads: Callable[[bytes], Any] = pickle.loads
        elif serializer == "json":
            self._dumps, self._loads = _json_dumps, json.loads
        elif isinstance(serializer, tuple) and len(serializer) == 2 and all(map(callable, serializer)):
            self._dumps, self._loads = serializer
        else:
            raise ValueError(
                f"serializer must be 'pickle', 'json' or a (dumps, loads) pair, got {serializer!r}"
            )
        self.serializer = serializer
        if serializer == "pickle" and _decodes_responses(client):
            raise ValueError("the pickle serializer needs a Redis client with decode_responses=False")
        self.channel = channel
        if origin is None:
            origin = os.urandom(8).hex()
        if not isinstance(origin, str) or not origin or "\x00" in origin:
            raise ValueError(f"origin must be a non-empty str without NUL, got {origin!r}")
        self.origin = origin
        self._origin_b = origin.encode("utf-8")
        self._url: tuple[str, dict[str, Any]] | None = None

    @classmethod
    def from_url(cls, url: str, *, client_options: dict[str, Any] | None = None, **kwargs: Any) -> RedisStore:
        """A store on ``redis.Redis.from_url(url, **client_options)``.

        Unlike a store given a client object, it can be pickled (it
        reconnects to the same URL), so a cache that uses it can be passed to
        ``spawn`` and ``forkserver`` workers.
        """
        import redis

        options = dict(client_options or {})
        store = cls(redis.Redis.from_url(url, **options), **kwargs)
        store._url = (url, options)
        return store

    # ----- pickling (spawn workers get a cache as "reopen with these callbacks")

    def __reduce__(self) -> Any:
        if self._url is None:
            raise TypeError(
                "a RedisStore made from a client object cannot be pickled: "
                "use RedisStore.from_url(...) to pass it to other processes"
            )
        url, options = self._url
        kwargs = dict(
            prefix=self.prefix, serializer=self.serializer, channel=self.channel, origin=self.origin
        )
        return (_from_url, (url, options, kwargs))

    # ----- keys and values

    def redis_key(self, key: str | bytes) -> bytes:
        """The Redis key of a cache key: prefix + key (UTF-8 for str)."""
        return self.prefix + _as_bytes(key)

    def dumps(self, value: Any) -> bytes:
        data = self._dumps(value)
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"serializer returned {type(data).__name__}, not bytes")
        return bytes(data)

    def loads(self, data: bytes | str) -> Any:
        if isinstance(data, str):  # a client with decode_responses=True
            data = data.encode("utf-8")
        return self._loads(data)

    # ----- the fastmmap callbacks

    def read_cb(self, context: Any, key: str | bytes) -> Any:
        """fastmmap read_cb: the value in Redis, or None if it has none."""
        data = self.client.get(self.redis_key(key))
        if data is None:
            return None
        return self.loads(data)

    def write_cb(self, context: Any, key: str | bytes, value: Any, expire_on: float) -> None:
        """fastmmap write_cb: SET with PXAT at expire_on (0: no expiry); PUBLISH if channel is set."""
        rkey = self.redis_key(key)
        pipe = self.client.pipeline(transaction=False)
        if expire_on and expire_on <= time.time():
            pipe.delete(rkey)  # already expired: what Redis holds is out of date too
        elif expire_on:
            # PXAT: expire_on has milliseconds (rounded up: never before fastmmap's entry)
            pipe.set(rkey, self.dumps(value), pxat=math.ceil(expire_on * 1000))
        else:
            pipe.set(rkey, self.dumps(value))
        if self.channel is not None:
            pipe.publish(self.channel, self._message(key))
        pipe.execute()

    def delete_cb(self, context: Any, key: str | bytes) -> None:
        """fastmmap delete_cb: DEL; PUBLISH if channel is set."""
        rkey = self.redis_key(key)
        if self.channel is None:
            self.client.delete(rkey)
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(rkey)
        pipe.publish(self.channel, self._message(key))
        pipe.execute()

    def cache_options(self) -> dict[str, Any]:
        """``dict(read_cb=..., write_cb=..., delete_cb=...)`` for ``fastmmap.Cache(**...)``."""
        return dict(read_cb=self.read_cb, write_cb=self.write_cb, delete_cb=self.delete_cb)

    # ----- invalidation

    def _message(self, key: str | bytes) -> bytes:
        return self._origin_b + _SEP + _as_bytes(key)

    def parse_message(self, data: bytes | str) -> tuple[str, bytes] | None:
        """(origin, key) of an invalidation message; None if it is not one."""
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        origin, sep, key = data.partition(_SEP)
        if not sep:
            return None
        return origin.decode("utf-8", "replace"), key

    def subscribe(self, cache: Cache, *, poll_interval: float = 0.1) -> Subscription:
        """Start a thread that drops keys other hosts changed from ``cache``.

        Subscribes before returning, so every message published afterwards
        is seen.  Returns a ``Subscription``; call ``.stop()`` (or use it as
        a context manager) to end the thread.  One subscriber per host is
        enough: the cache file is shared by all of its processes.
        """
        if self.channel is None:
            raise ValueError("this RedisStore has no channel: create it with channel=...")
        return Subscription(self, cache, poll_interval)


def _from_url(url: str, options: dict[str, Any], kwargs: dict[str, Any]) -> RedisStore:
    return RedisStore.from_url(url, client_options=options, **kwargs)


def _decodes_responses(client: Any) -> bool:
    try:
        return bool(client.get_encoder().decode_responses)
    except Exception:  # not a redis-py client: let it be
        return False


class Subscription:
    """The invalidation thread started by ``RedisStore.subscribe(cache)``.

    ``stop()`` ends it (idempotent).  ``messages`` counts the invalidations
    received from other origins, ``invalidated`` the keys they removed from
    the local cache (the others were not in it), ``errors`` the Redis errors survived (the
    thread retries every half second; messages published while it was
    disconnected are lost, so give the cache an ``expire_time`` to bound
    how stale a copy can get), ``last_error`` is the latest of them.
    """

    def __init__(self, store: RedisStore, cache: Cache, poll_interval: float = 0.1) -> None:
        self.store = store
        self.cache = cache
        self.poll_interval = poll_interval
        self.messages = 0
        self.invalidated = 0
        self.errors = 0
        self.last_error: BaseException | None = None
        self._stop = threading.Event()
        self._pubsub = store.client.pubsub()
        try:
            self._pubsub.subscribe(store.channel)
            self._wait_subscribed(timeout=10.0)
        except BaseException:
            self._pubsub.close()
            raise
        self._thread = threading.Thread(
            target=self._run, name=f"fastmmap-redis-invalidation-{store.channel!r}", daemon=True
        )
        self._thread.start()

    def _wait_subscribed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self._pubsub.get_message(timeout=0.1)
            if msg is None:
                continue
            if msg["type"] == "subscribe":
                return
            self._handle(msg)  # cannot happen before the confirmation, but harmless
        raise TimeoutError(f"no confirmation of SUBSCRIBE {self.store.channel!r} from Redis in {timeout}s")

    def _handle(self, msg: dict[str, Any]) -> None:
        if msg.get("type") != "message":
            return
        parsed = self.store.parse_message(msg["data"])
        if parsed is None or parsed[0] == self.store.origin:
            return  # not an invalidation, or our own write
        self.messages += 1
        if self.cache.get_and_remove(parsed[1], _MISSING) is not _MISSING:
            self.invalidated += 1

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self.cache.closed:
                    return
                try:
                    msg = self._pubsub.get_message(timeout=self.poll_interval)
                    if msg is not None:
                        self._handle(msg)
                except Exception as e:  # Redis away: retry; redis-py resubscribes on reconnect
                    if self._stop.is_set() or self.cache.closed:
                        return
                    self.errors += 1
                    self.last_error = e
                    self._stop.wait(0.5)
        finally:
            try:
                self._pubsub.close()
            except Exception:
                pass

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the thread and wait for it (up to timeout seconds)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_alive() else "stopped"
        return (
            f"<fastmmap.contrib.redis.Subscription {self.store.channel!r} {state}, "
            f"{self.invalidated} invalidated>"
        )
