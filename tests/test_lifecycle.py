"""Opening, closing, temp files, unlink/empty on exit, fork, pickle, spawn."""

from __future__ import annotations

import multiprocessing
import operator
import os
import pickle
import subprocess
import sys

import pytest

import fastmmap


# ---------------------------------------------------------------- close


CLOSED_OPS = [
    ("get", lambda c: c.get("k")),
    ("set", lambda c: c.set("k", 1)),
    ("getitem", lambda c: c["k"]),
    ("setitem", lambda c: c.__setitem__("k", 1)),
    ("delitem", lambda c: c.__delitem__("k")),
    ("contains", lambda c: "k" in c),
    ("len", lambda c: len(c)),
    ("iter", lambda c: list(iter(c))),
    ("keys", lambda c: list(c.keys())),
    ("items", lambda c: list(c.items())),
    ("exists", lambda c: c.exists("k")),
    ("remove", lambda c: c.remove("k")),
    ("expire", lambda c: c.expire("k")),
    ("get_and_set", lambda c: c.get_and_set("k", lambda k, v: 1)),
    ("get_and_remove", lambda c: c.get_and_remove("k")),
    ("clear", lambda c: c.clear()),
    ("purge", lambda c: c.purge()),
    ("empty", lambda c: c.empty()),
    ("get_keys", lambda c: c.get_keys(0)),
    ("get_statistics", lambda c: c.get_statistics()),
    ("multi_get", lambda c: c.multi_get("p", ["k"])),
    ("multi_set", lambda c: c.multi_set("p", {"k": 1})),
    ("update", lambda c: c.update({"k": 1})),
]


@pytest.mark.parametrize("op", [op for _, op in CLOSED_OPS], ids=[name for name, _ in CLOSED_OPS])
def test_operations_on_a_closed_cache_raise_valueerror(cache, op):
    path = cache.path()
    c = cache(path, num_pages=1, enable_stats=True, unlink_on_exit=False)
    c["k"] = "v"
    c.close()
    with pytest.raises(ValueError):
        op(c)
    # ... and the file was not touched by the failed operation.
    assert cache(path)["k"] == "v"


def test_close_is_idempotent(cache):
    c = cache(num_pages=1)
    c.close()
    c.close()
    c.close()


def test_properties_after_close_do_not_crash(cache):
    c = cache(num_pages=1)
    path = c.share_file
    c.close()
    for name in ("share_file", "page_size", "num_pages", "cache_size", "expire_time"):
        try:
            getattr(c, name)
        except ValueError:
            pass
    repr(c)
    assert path


def test_context_manager_closes(cache):
    path = cache.path()
    with fastmmap.Cache(path, num_pages=1, unlink_on_exit=False) as c:
        assert isinstance(c, fastmmap.Cache)
        c["k"] = "v"
    with pytest.raises(ValueError):
        c.get("k")
    assert cache(path)["k"] == "v"


def test_context_manager_closes_on_error(cache):
    path = cache.path()
    with pytest.raises(KeyError):
        with fastmmap.Cache(path, num_pages=1) as c:
            c["missing"]
    with pytest.raises(ValueError):
        len(c)
    assert not os.path.exists(path)  # created here: unlinked at close


def test_many_opens_and_closes(cache):
    path = cache.path()
    keep = cache(path, num_pages=3)
    for i in range(300):
        with fastmmap.Cache(path) as c:
            c[f"k{i % 10}"] = i
    assert keep["k9"] == 299


# ---------------------------------------------------------------- temp files and unlink


def test_share_file_none_makes_a_private_temp_file_removed_at_close():
    c = fastmmap.Cache(None, num_pages=1)
    try:
        path = c.share_file
        assert path and os.path.isfile(path)
        c["k"] = "v"
        assert c["k"] == "v"
    finally:
        c.close()
    assert not os.path.exists(path)


def test_two_temp_caches_are_distinct():
    a = fastmmap.Cache(num_pages=1)
    b = fastmmap.Cache(num_pages=1)
    try:
        assert a.share_file != b.share_file
        a["k"] = "a"
        assert "k" not in b
    finally:
        a.close()
        b.close()


def test_created_file_is_unlinked_at_close_by_default(cache):
    path = cache.path()
    c = cache(path, num_pages=1)
    assert os.path.exists(path)
    c.close()
    assert not os.path.exists(path)


def test_existing_file_is_kept_at_close_by_default(cache):
    path = cache.path()
    creator = cache(path, num_pages=1, unlink_on_exit=False)
    creator["k"] = "v"
    creator.close()
    opener = cache(path)
    opener.close()
    assert os.path.exists(path)
    assert cache(path)["k"] == "v"


def test_unlink_on_exit_false_keeps_a_created_file(cache):
    path = cache.path()
    c = cache(path, num_pages=1, unlink_on_exit=False)
    c.close()
    assert os.path.exists(path)


def test_unlink_on_exit_true_removes_an_existing_file(cache):
    path = cache.path()
    cache(path, num_pages=1, unlink_on_exit=False).close()
    c = cache(path, unlink_on_exit=True)
    c.close()
    assert not os.path.exists(path)


def test_closing_the_creator_leaves_other_handles_working(cache):
    path = cache.path()
    creator = cache(path, num_pages=1)
    other = cache(path)
    creator["k"] = "v"
    creator.close()  # unlinks the path, but the mapping lives on
    assert other["k"] == "v"
    other["k2"] = "v2"
    assert other["k2"] == "v2"


def test_empty_on_exit(cache):
    path = cache.path()
    creator = cache(path, num_pages=3, empty_on_exit=True, unlink_on_exit=False)
    other = cache(path)
    creator["a"] = 1
    creator["b"] = 2
    assert len(other) == 2
    creator.close()
    assert len(other) == 0


def test_empty_on_exit_only_in_the_creating_process(cache, forked):
    path = cache.path()
    c = cache(path, num_pages=3, empty_on_exit=True, unlink_on_exit=True)
    c["k"] = "v"

    def child():
        c["from-child"] = 1
        c.close()  # not the creating process: neither empties nor unlinks
        return os.path.exists(path)

    assert forked(child) is True
    assert os.path.exists(path)
    assert c["k"] == "v" and c["from-child"] == 1


# ---------------------------------------------------------------- fork


def test_forked_child_uses_the_parents_cache_without_setup(cache, forked):
    c = cache(num_pages=5)
    c["from-parent"] = {"x": 1}

    def child():
        seen = c["from-parent"]
        c["from-child"] = [1, 2, 3]
        c.get_and_set("counter", lambda k, v: (v or 0) + 1)
        return seen

    assert forked(child) == {"x": 1}
    assert c["from-child"] == [1, 2, 3]
    assert c["counter"] == 1


def test_forked_child_of_a_temp_cache_does_not_unlink_it(forked):
    c = fastmmap.Cache(None, num_pages=1)
    try:
        path = c.share_file

        def child():
            c["k"] = "child"
            c.close()
            return os.path.exists(path)

        assert forked(child) is True
        assert os.path.exists(path)
        assert c["k"] == "child"
    finally:
        c.close()
    assert not os.path.exists(path)


def test_fork_context_process(cache):
    c = cache(num_pages=3)
    c["k"] = 41
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_bump, args=(c,))
    p.start()
    p.join(30)
    if p.is_alive():
        p.kill()
        p.join()
        pytest.fail("fork-context child still running after 30s: possible deadlock")
    assert p.exitcode == 0
    assert c["k"] == 42


def _bump(c):
    c.get_and_set("k", lambda k, v: v + 1)


# ---------------------------------------------------------------- pickle and spawn


def test_pickle_reopens_the_same_file(cache):
    c = cache(num_pages=7, page_size=4096, expire_time=30)
    c["k"] = "v"
    clone = cache.adopt(pickle.loads(pickle.dumps(c)))
    assert clone is not c
    assert os.fspath(clone.share_file) == os.fspath(c.share_file)
    assert (clone.page_size, clone.num_pages, clone.expire_time) == (4096, 7, 30)
    assert clone["k"] == "v"
    clone["k2"] = "v2"
    assert c["k2"] == "v2"


def test_pickle_of_a_temp_cache(cache):
    c = cache(None, num_pages=1)
    c["k"] = 1
    clone = cache.adopt(pickle.loads(pickle.dumps(c)))
    assert clone["k"] == 1
    clone.close()
    assert os.path.exists(c.share_file), "only the creating Cache unlinks"


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_spawn_pool_worker_reads_the_parents_key(cache):
    c = cache(num_pages=3)
    c["shared"] = {"answer": 42}
    ctx = multiprocessing.get_context("spawn")
    pool = ctx.Pool(1)
    try:
        # Only stdlib callables cross the process boundary: the worker needs
        # to import nothing from the test suite, just fastmmap (via pickle).
        worker_pid = pool.apply_async(os.getpid).get(timeout=60)
        got = pool.apply_async(operator.methodcaller("get", "shared"), (c,)).get(timeout=60)
        stored = pool.apply_async(operator.methodcaller("set", "from-worker", worker_pid), (c,)).get(timeout=60)
    finally:
        pool.close()
        pool.join()
    assert worker_pid != os.getpid()
    assert got == {"answer": 42}
    assert stored is True
    assert c["from-worker"] == worker_pid
    assert os.path.exists(c.share_file), "a worker must not unlink the parent's file"
    assert c["shared"] == {"answer": 42}


def test_interpreter_exit_without_close_unlinks_and_empties(cache, tmp_path):
    """unlink_on_exit and empty_on_exit also act when the creating process
    exits without calling close()."""
    created = tmp_path / "created.fmm"
    kept = tmp_path / "kept.fmm"
    script = f"""
import fastmmap
t = fastmmap.Cache(None, num_pages=1)
print(t.share_file)
c = fastmmap.Cache({str(created)!r}, num_pages=1)
k = fastmmap.Cache({str(kept)!r}, num_pages=1, unlink_on_exit=False, empty_on_exit=True)
t["k"] = c["k"] = k["k"] = 1
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    temp_path = proc.stdout.strip()
    assert temp_path and not os.path.exists(temp_path)
    assert not created.exists()
    assert kept.exists()
    assert len(cache(str(kept))) == 0
