"""A FastAPI hit counter shared by every uvicorn worker through one fastmmap file.

uvicorn starts each worker as a new process that imports this module, so
each worker opens the file itself (``unlink_on_exit`` is False in the
backend: a worker that exits does not remove it)::

    FASTMMAP_COUNTER_CACHE=/dev/shm/asgi-counter.cache \\
        uvicorn --workers 4 --host 127.0.0.1 --port 8000 examples.asgi_counter:app

    # or gunicorn with uvicorn's worker class
    FASTMMAP_COUNTER_CACHE=/dev/shm/asgi-counter.cache \\
        gunicorn -w 4 -k uvicorn.workers.UvicornWorker -b 127.0.0.1:8000 examples.asgi_counter:app

Endpoints (plain text; the serving worker's pid is in ``X-Worker-Pid``):

- ``/incr``: add one to the counter with aiocache's ``increment`` on
  ``fastmmap.contrib.aiocache.FastMmapCache`` (atomic across workers) and
  return the new value; ``/value``: the current value;
- ``/square/{n}``: n * n, cached for 60 s with aiocache's ``cached``
  decorator in the same file, so that every worker serves what one
  computed (``X-Computed-By`` names the worker that computed it).
"""

from __future__ import annotations

import os
import tempfile

from aiocache import cached
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from fastmmap.contrib.aiocache import FastMmapCache

CACHE_PATH = os.environ.get("FASTMMAP_COUNTER_CACHE") or os.path.join(
    tempfile.gettempdir(), "fastmmap-asgi-counter.cache"
)

# Every worker must open the file with the same size options.
cache = FastMmapCache(CACHE_PATH, cache_size="256k", namespace="counter:")
app = FastAPI()


def _text(body: object, **headers: str) -> PlainTextResponse:
    return PlainTextResponse(f"{body}\n", headers={"X-Worker-Pid": str(os.getpid()), **headers})


@app.get("/incr")
async def incr() -> PlainTextResponse:
    return _text(await cache.increment("hits"))


@app.get("/value")
async def value() -> PlainTextResponse:
    return _text(await cache.get("hits", default=0))


# aiocache's decorator builds its own backend from the class and options
@cached(cache=FastMmapCache, share_file=CACHE_PATH, cache_size="256k", namespace="square:", ttl=60)
async def compute_square(n: int) -> dict[str, int]:
    return {"square": n * n, "pid": os.getpid()}


@app.get("/square/{n}")
async def square(n: int) -> PlainTextResponse:
    result = await compute_square(n)
    return _text(result["square"], **{"X-Computed-By": str(result["pid"])})
