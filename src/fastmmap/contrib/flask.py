"""Flask-Caching backend: ``CACHE_TYPE = "fastmmap.contrib.flask.FastMmapCache"``.

Flask-Caching calls a ``CACHE_TYPE`` whose path contains "cachelib" as a
plain cachelib class, ignoring CACHE_DIR and CACHE_KEY_PREFIX; this name
points it at the factory instead, which honours them.  See
``fastmmap.contrib.cachelib`` for the backend itself.
"""

from .cachelib import fastmmap_cache as FastMmapCache

__all__ = ["FastMmapCache"]
