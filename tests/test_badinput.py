"""Every bad input raises the stated exception and leaves the cache unchanged."""

from __future__ import annotations

import os
import shutil
import threading

import pytest

import fastmmap

BAD_KEYS = [1, 1.5, None, ("a", "b"), ["a"], bytearray(b"a"), memoryview(b"a"), object()]

KEY_OPS = [
    ("get", lambda c, k: c.get(k)),
    ("get-default", lambda c, k: c.get(k, 0)),
    ("set", lambda c, k: c.set(k, "v")),
    ("getitem", lambda c, k: c[k]),
    ("setitem", lambda c, k: c.__setitem__(k, "v")),
    ("contains", lambda c, k: k in c),
    ("delitem", lambda c, k: c.__delitem__(k)),
    ("exists", lambda c, k: c.exists(k)),
    ("remove", lambda c, k: c.remove(k)),
    ("expire", lambda c, k: c.expire(k)),
    ("get_and_set", lambda c, k: c.get_and_set(k, lambda key, v: "x")),
    ("get_and_remove", lambda c, k: c.get_and_remove(k)),
]


@pytest.fixture
def full(cache):
    """A cache holding some content, checked unchanged at teardown."""
    c = cache(num_pages=3, page_size=8192)
    c._set_time_override(1_700_000_000)
    c.update({"a": 1, b"b": b"2", "1": "one", "None": None, "('a', 'b')": (1,)})
    before = dict(c.items())
    yield c
    assert dict(c.items()) == before, "the failed call changed the cache"


@pytest.mark.parametrize("op", [op for _, op in KEY_OPS], ids=[n for n, _ in KEY_OPS])
@pytest.mark.parametrize("key", BAD_KEYS, ids=lambda k: type(k).__name__)
def test_bad_key_type_raises_typeerror(full, op, key):
    with pytest.raises(TypeError):
        op(full, key)


@pytest.mark.parametrize("key", [1, None, ("a",)], ids=repr)
def test_bad_key_in_multi_ops(full, key):
    with pytest.raises(TypeError):
        full.multi_set("p", {key: 1})
    with pytest.raises(TypeError):
        full.multi_get("p", [key])
    with pytest.raises(TypeError):
        full.multi_get(key, ["a"])


def test_bad_key_in_update_leaves_earlier_keys_as_for_a_dict(cache):
    # (dict.update semantics: items before the bad one are stored; not checked here)
    c = cache(num_pages=1)
    with pytest.raises(TypeError):
        c.update({1: "x"})
    assert len(c) == 0


# ---------------------------------------------------------------- set arguments


@pytest.mark.parametrize("expire", ["1 month", -5, "garbage", "5x", "-1s"], ids=repr)
def test_bad_expire_time_in_set_raises_valueerror(full, expire):
    with pytest.raises(ValueError):
        full.set("a", "new", expire_time=expire)
    with pytest.raises(ValueError):
        full.set("new-key", "new", expire)


def test_bad_expire_on_in_set(full):
    with pytest.raises((TypeError, ValueError)):
        full.set("a", "new", expire_on="tomorrow")


MAX_EXPIRE_TIME = fastmmap._options.MAX_EXPIRE_TIME
EXPIRE_CALLS = [
    ("set", lambda c, e: c.set("a", "new", expire_time=e)),
    ("set-positional", lambda c, e: c.set("a", "new", e)),
    ("add", lambda c, e: c.add("new-key", "new", expire_time=e)),
    ("touch", lambda c, e: c.touch("a", expire_time=e)),
    ("multi_set", lambda c, e: c.multi_set("p", {"x": 1}, expire_time=e)),
    ("get_and_set", lambda c, e: c.get_and_set("a", lambda k, v: "new", expire_time=e)),
]


@pytest.mark.parametrize("call", [f for _, f in EXPIRE_CALLS], ids=[n for n, _ in EXPIRE_CALLS])
@pytest.mark.parametrize(
    "expire",
    # every form of a duration above the maximum, one rule for all
    [MAX_EXPIRE_TIME + 1, 2**31, 2**40, 2**64, float(MAX_EXPIRE_TIME + 1), str(MAX_EXPIRE_TIME + 1), -(2**64)],
    ids=repr,
)
def test_per_call_expire_time_above_the_maximum_is_refused_in_every_form(full, call, expire):
    with pytest.raises(ValueError, match=r"^expire_time must be"):
        call(full, expire)


def test_per_call_expire_time_at_the_maximum_is_accepted(cache):
    c = cache(num_pages=1)
    c._set_time_override(1_700_000_000)
    c.set("k", "v", expire_time=MAX_EXPIRE_TIME)
    assert c.get_keys(1)[0]["expire_on"] == 1_700_000_000 + MAX_EXPIRE_TIME


@pytest.mark.parametrize("expire_on", [-1, -0.5, -0.001, -1e-300, float("-inf"), float("nan"), 2**32, 2**32 - 0.5,
                                       2**64])
def test_negative_or_too_large_expire_on_is_refused_in_every_form(full, expire_on):
    # checked before rounding up: -0.5 must not become 0 (never)
    with pytest.raises(ValueError, match=r"^expire_on must be unix seconds between 0 \(never\) and 2\*\*32-1"):
        full.set("a", "new", expire_on=expire_on)


@pytest.mark.parametrize("mode", [2**32, 2**63, 2**64, -(2**64), -1, 3])
def test_get_keys_mode_out_of_range_is_a_valueerror(full, mode):
    # any int out of range, not an OverflowError, nor one truncated to a C int
    with pytest.raises(ValueError, match=r"^get_keys mode must be 0, 1 or 2, not " + str(mode)):
        full.get_keys(mode)


@pytest.mark.parametrize("expire", ["1 month", -5, "garbage"], ids=repr)
def test_bad_expire_time_in_multi_set(full, expire):
    with pytest.raises(ValueError):
        full.multi_set("p", {"x": 1}, expire_time=expire)


def test_set_with_unknown_keyword(full):
    with pytest.raises(TypeError):
        full.set("a", "new", ttl=5)
    with pytest.raises(TypeError):
        full.set("a")


def test_get_and_set_with_a_non_callable(full):
    for fn in (None, 1, "fn", [len]):
        with pytest.raises(TypeError):
            full.get_and_set("a", fn)
        with pytest.raises(TypeError):
            full.get_and_set("missing", fn)


def test_unpicklable_value(full):
    with pytest.raises(TypeError):
        full.set("a", threading.Lock())
    with pytest.raises(TypeError):
        full["new"] = threading.Lock()


def test_too_big_value(full):
    assert full.set("a", b"x" * 8192) is False
    with pytest.raises(ValueError):
        full["a"] = b"x" * 8192
    with pytest.raises(ValueError):
        full["brand-new"] = "x" * 20000


def test_get_keys_bad_mode(full):
    for mode in (3, -1, "1"):
        with pytest.raises((ValueError, TypeError)):
            full.get_keys(mode)


# ---------------------------------------------------------------- constructor


BAD_OPTIONS = [
    ({"no_such_option": 1}, TypeError),
    ({"pagesize": 4096}, TypeError),
    ({"page_size": "abc"}, ValueError),
    ({"page_size": -1}, ValueError),
    ({"page_size": 100}, ValueError),
    ({"page_size": 1023}, ValueError),
    ({"page_size": "1g2"}, ValueError),
    ({"page_size": "4g"}, ValueError),
    ({"num_pages": 0}, ValueError),
    ({"num_pages": -3}, ValueError),
    ({"cache_size": "abc"}, ValueError),
    ({"cache_size": -1}, ValueError),
    ({"expire_time": "1 month"}, ValueError),
    ({"expire_time": -5}, ValueError),
    ({"expire_time": "garbage"}, ValueError),
    ({"lock_timeout": 0}, ValueError),
    ({"lock_timeout": -1}, ValueError),
    ({"permissions": 0o10000}, ValueError),
    ({"permissions": -1}, ValueError),
    ({"permissions": 0}, ValueError),
    ({"compress_threshold": 2**63}, ValueError),
    ({"compress_threshold": 2**64}, ValueError),
    ({"compress_threshold": -1}, ValueError),
    ({"serializer": "nope"}, ValueError),
]


@pytest.mark.parametrize("opts, exc", BAD_OPTIONS, ids=[repr(o) for o, _ in BAD_OPTIONS])
def test_bad_constructor_option_on_a_new_path(cache, opts, exc):
    path = cache.path()
    with pytest.raises(exc):
        fastmmap.Cache(path, **opts)
    assert not os.path.exists(path), "a rejected constructor call created the file"
    assert os.listdir(os.path.dirname(path)) == [], "a rejected constructor call left files behind"


@pytest.mark.parametrize("opts, exc", BAD_OPTIONS, ids=[repr(o) for o, _ in BAD_OPTIONS])
def test_bad_constructor_option_on_an_existing_cache(cache, opts, exc):
    path = cache.path()
    c = cache(path, num_pages=3, page_size=4096)
    c["k"] = "v"
    with open(path, "rb") as f:
        raw = f.read()
    with pytest.raises(exc):
        fastmmap.Cache(path, **opts)
    with open(path, "rb") as f:
        assert f.read() == raw, "a rejected constructor call changed the file"
    assert dict(c.items()) == {"k": "v"}


def test_bad_constructor_option_with_init_file_keeps_data(cache):
    path = cache.path()
    c = cache(path, num_pages=3, page_size=4096)
    c["k"] = "v"
    with pytest.raises(ValueError):
        fastmmap.Cache(path, init_file=True, expire_time="garbage")
    assert c["k"] == "v"


def test_positional_options_are_rejected(cache):
    with pytest.raises(TypeError):
        fastmmap.Cache(cache.path(), True)


def test_bad_share_file_type(cache):
    with pytest.raises(TypeError):
        fastmmap.Cache(42)


# ---------------------------------------------------------------- files that are not caches


@pytest.mark.parametrize("size", [100, 4096, 8192 + 4096], ids=lambda n: f"{n}-bytes")
def test_a_non_fastmmap_file_raises_error_and_is_untouched(tmp_path, rand, size):
    path = tmp_path / "not-a-cache"
    data = rand.randbytes(size)
    path.write_bytes(data)
    os.chmod(path, 0o644)
    with pytest.raises(fastmmap.Error):
        fastmmap.Cache(str(path))
    with pytest.raises(fastmmap.Error):
        fastmmap.Cache(str(path), num_pages=1, page_size=8192)
    assert path.read_bytes() == data, "opening a foreign file modified it"
    assert (os.stat(path).st_mode & 0o7777) == 0o644
    assert os.listdir(tmp_path) == ["not-a-cache"]


def test_an_empty_file_becomes_a_cache(tmp_path):
    # By design: a path made by mkstemp() (an empty file) is initialised.
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with fastmmap.Cache(str(path), num_pages=2, page_size=4096) as c:
        c["k"] = "v"
        assert c["k"] == "v"
        assert c.num_pages == 2
        assert os.path.getsize(path) == 4096 + 2 * 4096


def test_a_text_file_raises_error(tmp_path):
    path = tmp_path / "notes.txt"
    data = b"FASTMMAP? no, just some text\n" * 500
    path.write_bytes(data)
    with pytest.raises(fastmmap.Error):
        fastmmap.Cache(str(path))
    assert path.read_bytes() == data


def test_a_directory_as_share_file_raises_oserror(tmp_path):
    d = tmp_path / "adir"
    d.mkdir()
    (d / "inside").write_text("keep")
    with pytest.raises(OSError) as info:
        fastmmap.Cache(str(d))
    assert info.value.filename is not None
    assert sorted(os.listdir(d)) == ["inside"]
    assert (d / "inside").read_text() == "keep"


def test_a_missing_directory_raises_oserror_with_filename(tmp_path):
    path = tmp_path / "no" / "such" / "dir" / "cache"
    with pytest.raises(OSError) as info:
        fastmmap.Cache(str(path), num_pages=1)
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.filename is not None


def test_a_symlink_as_share_file_is_refused(cache, tmp_path):
    real = cache(num_pages=1)
    real["k"] = "v"
    link = tmp_path / "link"
    link.symlink_to(real.share_file)
    with pytest.raises(OSError):
        fastmmap.Cache(str(link))
    assert real["k"] == "v"
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "target-that-does-not-exist")
    with pytest.raises(OSError):
        fastmmap.Cache(str(dangling), num_pages=1)
    assert not (tmp_path / "target-that-does-not-exist").exists()


def test_share_file_accepts_path_objects(cache, tmp_path):
    path = tmp_path / "as-path"
    c = cache(path, num_pages=1)
    c["k"] = 1
    assert os.fspath(c.share_file) == str(path)
    assert cache(str(path))["k"] == 1


# ---------------------------------------------------------------- hostile file content
#
# The file is shared memory that any process with write access can scribble
# on.  A damaged file may lose entries, but must never crash or hang the
# reader, and init_file=True must always get a working, empty cache back.

HEADER_SIZE = 4096  # fmm.h FMM_HEADER_SIZE: pages start after the file header


def _make_file(path, rand):
    c = fastmmap.Cache(path, num_pages=2, page_size=8192, unlink_on_exit=False)
    for i in range(60):
        c[f"k{i}"] = f"value-{i}-" + "x" * rand.randint(0, 100)
    c.close()


def _scribble(path, rand, start, end, times):
    with open(path, "r+b") as f:
        for _ in range(times):
            off = rand.randrange(start, end - 1)
            n = min(rand.randint(1, 64), end - off)
            f.seek(off)
            f.write(rand.randbytes(n))


def _use_damaged(path):
    """Touch every entry and write new ones; report what happened."""
    outcomes = []

    def attempt(fn):
        try:
            fn()
            outcomes.append("ok")
        except Exception as e:  # noqa: BLE001 - any clean exception is acceptable here
            outcomes.append(type(e).__name__)

    try:
        c = fastmmap.Cache(path, lock_timeout=1)
    except (fastmmap.Error, OSError) as e:
        return [f"open:{type(e).__name__}"]
    ops = [lambda i=i: c.get(f"k{i}") for i in range(60)]
    ops += [lambda: c.get_keys(2), lambda: len(c)]
    ops += [lambda i=i: c.set(f"n{i}", i) for i in range(100)]
    for op in ops:
        attempt(op)
        if outcomes[-1] == "LockTimeout":
            break  # a page stuck locked: reported by the init_file check below
    c.close()
    return outcomes


def _reinit(path):
    c = fastmmap.Cache(path, init_file=True, lock_timeout=5)
    try:
        n = len(c)
        c["fresh"] = 1
        return n, c["fresh"]
    finally:
        c.close()


@pytest.mark.parametrize("where", ["page-data", "page-headers"])
def test_random_damage_never_crashes_or_hangs(cache, forked, rand, where):
    path = cache.path()
    for _ in range(5):
        _make_file(path, rand)
        size = os.path.getsize(path)
        if where == "page-data":
            _scribble(path, rand, HEADER_SIZE, size, rand.randint(1, 20))
        else:  # the start of each page: lock, counters, slot table
            for page in range(2):
                start = HEADER_SIZE + page * 8192
                _scribble(path, rand, start, start + 256, rand.randint(1, 4))
        forked(_use_damaged, path, timeout=30)  # fails on a crash or a hang
        # Whatever the damage, init_file=True gives back an empty, working cache.
        assert forked(_reinit, path, timeout=30) == (0, 1)


def test_init_file_recovers_a_file_whose_pages_are_garbage(cache, rand):
    """Every page overwritten (locks included): init_file=True must still
    hand back a working, empty cache of the same geometry."""
    path = cache.path()
    _make_file(path, rand)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(HEADER_SIZE)
        f.write(b"\xff" * (size - HEADER_SIZE))
    c = cache(path, init_file=True)
    assert (c.page_size, c.num_pages) == (8192, 2)
    assert len(c) == 0
    for i in range(50):
        c[f"k{i}"] = i
    assert c["k49"] == 49


def test_init_file_recovers_a_file_copied_while_a_page_was_locked(cache, forked, tmp_path):
    """A file whose lock word says "held" by a thread that no longer exists
    (a copy taken mid-operation, a machine that crashed with the file on
    disk): init_file=True must recover it, in bounded time."""
    path = cache.path()
    copy = str(tmp_path / "copy.fmm")
    c = cache(path, num_pages=1, page_size=8192)
    c["k"] = 1

    def snapshot_while_locked():
        def fn(key, old):
            shutil.copyfile(path, copy)
            return old + 1

        return c.get_and_set("k", fn)

    assert forked(snapshot_while_locked) == 2  # the child exits: its lock is stale in the copy
    assert c["k"] == 2
    assert forked(_reinit, copy, timeout=20) == (0, 1)
