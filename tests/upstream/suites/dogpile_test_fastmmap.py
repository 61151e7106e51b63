"""dogpile.cache's generic backend, mutex and serializer suites against
fastmmap's backend, registered as "fastmmap" by its entry point.

Copied by tests/upstream/run.py into dogpile.cache's tests/cache/ directory
and set up as its own test_dbm_backend.py sets up the dbm backend.
"""

import tempfile

from dogpile.testing.fixtures import _GenericBackendTestSuite
from dogpile.testing.fixtures import _GenericMutexTestSuite
from dogpile.testing.fixtures import _GenericSerializerTestSuite

# One file for the module, as dbm's tests use one: the suites clean up the
# keys they use.
_FILE = tempfile.mkdtemp(prefix="fmm-dogpile-") + "/dogpile.cache"


class FastMmapBackendTest(_GenericBackendTestSuite):
    backend = "fastmmap"
    config_args = {"arguments": {"filename": _FILE, "cache_size": "4m"}}


class FastMmapBackendSerializerTest(_GenericSerializerTestSuite, FastMmapBackendTest):
    pass


class FastMmapBackendMutexTest(_GenericMutexTestSuite):
    backend = "fastmmap"
    config_args = {"arguments": {"filename": _FILE, "cache_size": "4m"}}
