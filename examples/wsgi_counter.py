"""A WSGI hit counter shared by every worker process through one fastmmap file.

The cache is created when this module is imported.  With gunicorn's
``preload_app = True`` (``--preload``), or uWSGI without ``--lazy-apps``,
that happens once in the master, before it forks the workers, and every
worker inherits the mapping::

    FASTMMAP_COUNTER_CACHE=/dev/shm/counter.cache \\
        gunicorn -c examples/gunicorn.conf.py examples.wsgi_counter:app

    FASTMMAP_COUNTER_CACHE=/dev/shm/counter.cache \\
        uwsgi --master --processes 4 --http-socket 127.0.0.1:8000 --die-on-term \\
              --wsgi-file examples/wsgi_counter.py --callable app

Endpoints (plain text; the serving worker's pid is in ``X-Worker-Pid``):

- ``/incr``: add one to the counter, atomically across workers, and return
  the new value; ``/value``: the current value.
- ``/django-incr`` and ``/django-value``: the same through Django's cache
  API (``cache.incr``) on ``fastmmap.contrib.django.FastMmapCache``, in a
  file of its own (``FASTMMAP_COUNTER_CACHE`` + ``".django"``).  They answer
  501 with the reason when Django or the backend is not available.
"""

from __future__ import annotations

import os
import tempfile

import fastmmap

CACHE_PATH = os.environ.get("FASTMMAP_COUNTER_CACHE") or os.path.join(
    tempfile.gettempdir(), "fastmmap-wsgi-counter.cache"
)

# unlink_on_exit=False: without preloading, the first worker to import this
# module creates the file, and it must not remove it when it is recycled
# while the others go on using it.  The counter survives restarts.
cache = fastmmap.Cache(CACHE_PATH, cache_size="256k", unlink_on_exit=False)


def _django_cache():
    """Django's cache on FastMmapCache, or the reason it is unavailable."""
    try:
        import django  # noqa: F401
        from django.conf import settings

        import fastmmap.contrib.django  # noqa: F401
    except ImportError as e:
        return None, f"Django cache backend unavailable: {e}"
    if not settings.configured:
        settings.configure(
            CACHES={
                "default": {
                    "BACKEND": "fastmmap.contrib.django.FastMmapCache",
                    "LOCATION": CACHE_PATH + ".django",
                    "TIMEOUT": None,  # the counter never expires
                    "OPTIONS": {"cache_size": "256k"},
                }
            }
        )
    from django.core.cache import caches

    return caches["default"], None


django_cache, DJANGO_UNAVAILABLE = _django_cache()


def incr() -> int:
    with cache.lock("hits") as entry:  # the page lock: atomic across workers
        value = (entry.value or 0) + 1
        entry.value = value
    return value


def django_incr() -> int:
    django_cache.add("hits", 0)  # atomic: only the first request creates it
    return django_cache.incr("hits")


def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    status = "200 OK"
    if path == "/incr":
        body = str(incr())
    elif path == "/value":
        body = str(cache.get("hits", 0))
    elif path in ("/django-incr", "/django-value"):
        if django_cache is None:
            status, body = "501 Not Implemented", DJANGO_UNAVAILABLE
        elif path == "/django-incr":
            body = str(django_incr())
        else:
            body = str(django_cache.get("hits", 0))
    else:
        status, body = "404 Not Found", "try /incr, /value, /django-incr or /django-value"
    data = (body + "\n").encode()
    start_response(
        status,
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(data))),
            ("X-Worker-Pid", str(os.getpid())),
        ],
    )
    return [data]
