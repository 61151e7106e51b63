"""gunicorn settings for examples/wsgi_counter.py (run from the repository root).

    FASTMMAP_COUNTER_CACHE=/dev/shm/counter.cache gunicorn -c examples/gunicorn.conf.py

Command-line options override these (``--bind``, ``--workers``).
"""

import os

wsgi_app = "examples.wsgi_counter:app"

# Import the app in the master, before forking: the module-level
# fastmmap.Cache is created once and every worker inherits its mapping.
preload_app = True

workers = int(os.environ.get("WEB_CONCURRENCY", "4"))
bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
