"""The command line: python -m fastmmap stats/keys/get/check/clear FILE."""

import json
import subprocess
import sys

import pytest

import fastmmap


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "fastmmap", *args], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def cache_file(tmp_path):
    path = str(tmp_path / "cli.cache")
    c = fastmmap.Cache(path, num_pages=5, page_size="8k", enable_stats=True, unlink_on_exit=False)
    c["a"] = "hello"
    c[b"b"] = {"x": 1}
    c.set("gone", "x", expire_on=1)  # long expired
    assert c.get("a") == "hello"
    assert c.get("missing") is None
    c.close()
    return path


def test_stats_json(cache_file):
    r = run("stats", "--json", cache_file)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["num_pages"] == 5 and s["page_size"] == 8192 and s["cache_size"] == 5 * 8192
    assert s["entries"] == 2
    assert s["expired_entries"] == 1
    assert s["reads"] == 2 and s["read_hits"] == 1 and s["hit_rate"] == 0.5
    assert s["repaired_pages"] == 0


def test_stats_text(cache_file):
    r = run("stats", cache_file)
    assert r.returncode == 0, r.stderr
    assert "5 pages x 8.0 KiB" in r.stdout or "5 pages" in r.stdout
    assert "2 live, 1 expired" in r.stdout


def test_keys_and_get(cache_file):
    r = run("keys", cache_file)
    assert r.returncode == 0
    assert sorted(r.stdout.split()) == ["a", "b'b'"]
    r = run("get", cache_file, "a")
    assert (r.returncode, r.stdout) == (0, "hello\n")
    r = run("get", cache_file, "b")
    assert (r.returncode, r.stdout) == (0, "{'x': 1}\n")
    r = run("get", cache_file, "nope")
    assert r.returncode == 1 and "not found" in r.stderr


def test_check_ok_and_corrupt(cache_file):
    r = run("check", cache_file)
    assert r.returncode == 0 and "all pages valid" in r.stdout
    # Corrupt page 0's free_data field (page header offset 56): check reports it.
    with open(cache_file, "r+b") as f:
        f.seek(4096 + 56)
        f.write((12345).to_bytes(4, "little"))
    r = run("check", cache_file)
    assert r.returncode == 1
    assert "page 0" in r.stdout


def test_clear(cache_file):
    r = run("clear", cache_file)
    assert r.returncode == 0 and "removed 2" in r.stdout
    with fastmmap.Cache(cache_file) as c:
        assert len(c) == 0


def test_missing_file_is_not_created(tmp_path):
    path = tmp_path / "absent.cache"
    for cmd in ("stats", "keys", "check", "clear"):
        r = run(cmd, str(path))
        assert r.returncode == 2 and "no such cache file" in r.stderr
    assert not path.exists()


def test_not_a_cache_file(tmp_path):
    path = tmp_path / "junk"
    path.write_bytes(b"x" * 10000)
    r = run("check", str(path))
    assert r.returncode == 2 and "junk" in r.stderr


def test_bench_prints_a_table_with_fastmmap_and_the_ceiling():
    r = run("bench", "--ops", "2000")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(line.startswith("fastmmap ") for line in lines)
    assert any(line.startswith("dict (in-process") for line in lines)
    row = next(line for line in lines if line.startswith("fastmmap "))
    assert len(row.split()) == 3  # name, get hit/s, set/s
