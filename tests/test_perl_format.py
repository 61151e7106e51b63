"""format="perl": one cache file shared with Perl's Cache::FastMmap.

Every test here runs the real Perl module (Debian's libcache-fastmmap-perl,
installed by .ci/run) against fastmmap on the same file: values written on
one side are read on the other byte for byte, increments from both sides
add up, and both sides survive each other's evictions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import fastmmap
from fastmmap import _fastmmap, _options

APT_PACKAGES = Path(__file__).resolve().parent.parent / ".ci" / "APT_PACKAGES"


def need_perl(*modules: str, module_level: bool = False) -> None:
    """Skip, naming the Perl modules missing and their Debian packages.

    In CI (CI set) the tests fail instead: there .ci/run has installed the
    packages, and a test that skips there would hide a broken setup.
    """
    try:
        proc = subprocess.run(
            ["perl", "-e", 'for (@ARGV) { eval "require $_; 1" or print "$_\\n" }', *modules],
            capture_output=True, text=True, timeout=120,
        )
        missing = proc.stdout.split() if proc.returncode == 0 else list(modules)
    except FileNotFoundError:
        missing = ["perl"]
    if not missing:
        return
    # .ci/APT_PACKAGES probes each Perl module's package with `perl -MModule -e1`.
    packages = dict(
        (m.group(2), m.group(1))
        for m in re.finditer(r"^(\S+)\s+\S+\s+perl -M(\S+) -e1\s*$", APT_PACKAGES.read_text(), re.M)
    )
    names = ", ".join(f"{m} (Debian package {packages.get(m, 'perl')})" for m in missing)
    msg = (
        f"the Perl side of this test (the real Cache::FastMmap) is missing {names}; "
        "`make test` installs it when run as root with apt-get, else lists what to install"
    )
    if os.environ.get("CI"):
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg, allow_module_level=module_level)


need_perl("Cache::FastMmap", "JSON::PP", module_level=True)

PREAMBLE = r"""
use strict; use warnings;
use Cache::FastMmap;
use JSON::PP;
binmode STDOUT;
my $J = JSON::PP->new->canonical;
sub hexs { my $s = shift; return undef unless defined $s; utf8::encode($s) if utf8::is_utf8($s); return unpack("H*", $s); }
sub opened { my %o = @_; return Cache::FastMmap->new(unlink_on_exit => 0, serializer => '', %o); }
"""


def perl(code: str, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run a Perl snippet (with PREAMBLE) and return the finished process."""
    proc = subprocess.run(
        ["perl", "-e", PREAMBLE + textwrap.dedent(code), *args],
        capture_output=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"perl failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
    return proc


def perl_json(code: str, *args: str, timeout: float = 120) -> object:
    return json.loads(perl(code, *args, timeout=timeout).stdout)


def py_hash(key: bytes) -> int:
    """Cache::FastMmap's hash, written out in Python for the test vectors."""
    h = 0x92F7E3B1
    for c in key:
        h = (((h << 4) & 0xFFFFFFFF) + (h >> 28) + c) & 0xFFFFFFFF
    return h


@pytest.fixture
def share(tmp_path: Path) -> str:
    return str(tmp_path / "shared-with-perl")


def open_perl_format(path: str, **kw: object) -> fastmmap.Cache:
    kw.setdefault("serializer", "raw")
    return fastmmap.Cache(path, format="perl", **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- hashing and geometry


VECTORS = [
    (b"", 2465719217, 27, 27704710),
    (b"a", 796801914, 44, 8952830),
    (b"abc", 2117828786, 5, 23795829),
    (b"hello world", 2948198678, 75, 33125827),
    (b"key1", 3820531640, 71, 42927321),
    ("\u263a".encode(), 2117862761, 71, 23796210),
]


@pytest.mark.parametrize("key,h,page,slot", VECTORS)
def test_hash_vectors(key: bytes, h: int, page: int, slot: int) -> None:
    assert _fastmmap.perl_hash(key) == h
    assert py_hash(key) == h
    assert (h % 89, h // 89) == (page, slot)


def test_hash_matches_perl_fc_hash(share: str, rand) -> None:
    # The empty key first and last, whatever the random ones: the keys go
    # to Perl as one comma-joined argument, and a split without limit -1
    # drops trailing empty fields, i.e. a trailing empty key.
    keys = [b""] + [bytes(rand.randrange(256) for _ in range(rand.randrange(40))) for _ in range(300)] + [b""]
    out = perl_json(
        """
        my $c = opened(share_file => $ARGV[0], num_pages => 89, page_size => 4096);
        my @r;
        for my $hex (split /,/, $ARGV[1], -1) {
            my $k = pack("H*", $hex);
            my ($p, $s) = Cache::FastMmap::fc_hash($c->{Cache}, $k);
            push @r, [$p, $s];
        }
        print $J->encode(\\@r);
        """,
        share, ",".join(k.hex() for k in keys),
    )
    assert out == [[_fastmmap.perl_hash(k) % 89, _fastmmap.perl_hash(k) // 89] for k in keys]


GEOMETRIES = [
    {},
    {"page_size": 8192},
    {"page_size": "16k", "num_pages": 7},
    {"cache_size": "1m"},
    {"cache_size": "64k"},
    {"cache_size": "10m"},
    {"cache_size": "1m", "num_pages": 7},
    {"cache_size": 3_000_000, "page_size": 8192},
    {"page_size": 5000, "num_pages": 3},
]


@pytest.mark.parametrize("opts", GEOMETRIES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_geometry_matches_perl(share: str, opts: dict[str, object]) -> None:
    """Given the same options, Perl and Python map the same geometry, and
    a file created by Perl opens in Python with those options."""
    out = perl_json(
        """
        my %o = %{ decode_json($ARGV[1]) };
        my $c = opened(share_file => $ARGV[0], %o);
        print $J->encode([$c->{page_size}, $c->{num_pages}, -s $ARGV[0]]);
        """,
        share, json.dumps(opts),
    )
    page_size, num_pages, size = out  # type: ignore[misc]
    assert _options.compute_perl_geometry(
        opts.get("cache_size"), opts.get("page_size"), opts.get("num_pages")
    ) == (page_size, num_pages)
    c = open_perl_format(share, **opts)
    assert (c.page_size, c.num_pages) == (page_size, num_pages)
    assert os.path.getsize(share) == size == page_size * num_pages
    c.set("x", b"y")
    assert c.check() == []
    c.close()


def test_wrong_geometry_is_refused_not_deleted(share: str) -> None:
    perl("opened(share_file => $ARGV[0], num_pages => 3, page_size => 4096)->set('k', 'v');", share)
    with pytest.raises(fastmmap.GeometryError, match="init_file=True"):
        open_perl_format(share, num_pages=5, page_size=4096)
    assert os.path.getsize(share) == 3 * 4096  # untouched
    c = open_perl_format(share, num_pages=3, page_size=4096)
    assert c.get("k") == b"v"
    c.close()


# ---------------------------------------------------------------- values both ways


def make_items(n: int, rand) -> dict[str, bytes | str | None]:
    items: dict[str, bytes | str | None] = {}
    for i in range(n):
        key = f"k{i:05d}" if i % 5 else f"\u00e9\u263a-{i}"
        r = i % 7
        if i % 97 == 0:
            items[key] = None
        elif r in (0, 1, 2):
            items[key] = bytes(rand.randrange(256) for _ in range(rand.randrange(0, 200)))
        else:
            items[key] = "".join(rand.choice("abc \u00fc\u4e2d\u263a\n") for _ in range(rand.randrange(0, 80)))
    return items


def test_python_writes_perl_reads_10000(share: str, rand) -> None:
    items = make_items(10_000, rand)
    c = open_perl_format(share)
    for k, v in items.items():
        assert c.set(k, v) is True
    assert len(c) == 10_000
    out = perl_json(
        """
        my $c = opened(share_file => $ARGV[0]);
        my %r;
        for my $e ($c->get_keys(2)) {
            my $k = $e->{key};
            my $v = $c->get($k);   # also through get, not just the iterator
            die "get and get_keys disagree for $k" unless (defined($v) == defined($e->{value}))
                && (!defined $v || $v eq $e->{value});
            $r{hexs($k)} = [hexs($v), (utf8::is_utf8($v) ? 1 : 0), (utf8::is_utf8($k) ? 1 : 0)];
        }
        print $J->encode(\\%r);
        """,
        share,
    )
    assert isinstance(out, dict) and len(out) == 10_000
    for k, v in items.items():
        hexval, utf8val, utf8key = out[k.encode().hex()]
        if v is None:
            assert hexval is None
        elif isinstance(v, str):
            assert (bytes.fromhex(hexval).decode(), utf8val) == (v, 1)
        else:
            assert (bytes.fromhex(hexval), utf8val) == (v, 0)
        assert utf8key == 1  # a str key carries the UTF-8 flag, ASCII or not
    c.close()


def test_perl_writes_python_reads_10000(share: str) -> None:
    out = perl_json(
        r"""
        my $c = opened(share_file => $ARGV[0]);
        srand(42);
        my %w;
        for my $i (0 .. 9999) {
            my $k = $i % 5 ? sprintf("p%05d", $i) : "\x{263a}\x{e9}-$i";
            my $v;
            if ($i % 97 == 0) { $v = undef }
            elsif ($i % 3 == 0) { $v = join "", map { chr(0x20 + int(rand(0x24f))) } 1 .. int(rand(60)) }
            else { $v = join "", map { chr(int(rand(256))) } 1 .. int(rand(200)) }
            $c->set($k, $v) or die "set $k failed";
            $w{hexs($k)} = [hexs($v), (utf8::is_utf8($v) ? 1 : 0)];
        }
        print $J->encode(\%w);
        """,
        share,
    )
    assert isinstance(out, dict) and len(out) == 10_000
    c = open_perl_format(share)
    assert len(c) == 10_000
    for hk, (hexval, utf8) in out.items():
        key = bytes.fromhex(hk)
        got = c.get(key)
        if hexval is None:
            assert got is None and c.exists(key)
        elif utf8:
            assert got == bytes.fromhex(hexval).decode()
        else:
            assert got == bytes.fromhex(hexval)
    assert c.check() == []
    c.close()


def test_json_both_ways(share: str) -> None:
    need_perl("JSON")
    c = fastmmap.Cache(share, format="perl", serializer="json")
    c.set("py", {"list": [1, 2.5, None, True], "text": "\u00fcber \u263a", "n": -3})
    c.set("none", None)
    out = perl_json(
        """
        my $c = opened(share_file => $ARGV[0], serializer => 'json');
        $c->set('pl', { a => [1, 'two', undef], u => "\\x{263a}" });
        my $v = $c->get('py');
        my %keys = map { $_ => 1 } $c->get_keys(0);   # exists() is 1.59+
        print $J->encode([$v, defined($c->get('none')) ? 1 : 0, $keys{none} ? 1 : 0]);
        """,
        share,
    )
    assert out == [{"list": [1, 2.5, None, True], "text": "\u00fcber \u263a", "n": -3}, 0, 1]
    assert c.get("pl") == {"a": [1, "two", None], "u": "\u263a"}
    assert c.get("none") is None and c.exists("none")
    c.close()


@pytest.mark.parametrize("compressor", ["zlib", "lz4"])
def test_compressors_both_ways(share: str, compressor: str) -> None:
    if compressor == "lz4":
        need_perl("Compress::LZ4")
    c = open_perl_format(share, compressor=compressor)
    big = b"compressible " * 400
    c.set("py", big)
    c.set("pystr", "\u263a" * 100)
    out = perl_json(
        """
        my $c = opened(share_file => $ARGV[0], compressor => $ARGV[1]);
        $c->set('pl', 'from perl ' x 300);
        print $J->encode([hexs($c->get('py')), hexs($c->get('pystr'))]);
        """,
        share, compressor,
    )
    assert out == [big.hex(), ("\u263a" * 100).encode().hex()]
    assert c.get("pl") == b"from perl " * 300
    # the stored bytes really are compressed: a 5,200-byte value in a few hundred
    assert c.get_keys(1) and os.path.getsize(share) > 0
    c.close()


@pytest.mark.parametrize("serializer,module", [("storable", "Storable"), ("sereal", "Sereal")])
def test_storable_and_sereal_values(share: str, serializer: str, module: str) -> None:
    # A JSON reader names Perl's serializer; a raw reader returns the frozen
    # bytes, as Perl's own serializer => '' reader does.
    if serializer == "sereal":
        need_perl("Sereal::Encoder", "Sereal::Decoder")
    frozen = perl_json(
        """
        my $c = opened(share_file => $ARGV[0], serializer => $ARGV[1]);
        $c->set('obj', { a => [1, 2] }) or die;
        $c->set('scalar', 'plain') or die;
        my $raw = opened(share_file => $ARGV[0]);
        print $J->encode([hexs($raw->get('obj')), hexs($raw->get('scalar'))]);
        """,
        share, serializer,
    )
    assert isinstance(frozen, list)
    c = fastmmap.Cache(share, format="perl", serializer="json")
    for key in ("obj", "scalar"):
        with pytest.raises(fastmmap.Error, match=module):
            c.get(key)
    assert sorted(c.keys()) == [b"obj", b"scalar"]  # the keys still list
    c.close()
    c = open_perl_format(share)
    assert [c.get("obj").hex(), c.get("scalar").hex()] == frozen
    c.close()


# Raw values that start like Storable's nfreeze / freeze or Sereal's magic
# (about 1 random value in 65,536 starts like nfreeze).
STORABLE_LOOKALIKES = [b"\x05\x0b\x03abc", b"\x05\x00\x00", b"\x04\x0b\x0812345678\x00", b"=srl\x01xyz", b"=\xf3rl\x03"]


def test_raw_values_that_look_like_storable_read_back(share: str) -> None:
    c = open_perl_format(share)
    for i, v in enumerate(STORABLE_LOOKALIKES):
        c.set(f"k{i}", v)
    for i, v in enumerate(STORABLE_LOOKALIKES):
        assert c.get(f"k{i}") == v
    assert sorted(c.items()) == sorted((f"k{i}", v) for i, v in enumerate(STORABLE_LOOKALIKES))
    out = perl_json(
        """
        my $c = opened(share_file => $ARGV[0]);
        print $J->encode([map { hexs($c->get("k$_")) } 0 .. $ARGV[1] - 1]);
        """,
        share, str(len(STORABLE_LOOKALIKES)),
    )
    assert out == [v.hex() for v in STORABLE_LOOKALIKES]
    c.close()


def test_undef_reads_as_none(share: str) -> None:
    perl("my $c = opened(share_file => $ARGV[0]); $c->set('u', undef) or die;", share)
    c = open_perl_format(share)
    assert c.exists("u") and c.get("u", "default") is None
    c.close()


# ---------------------------------------------------------------- expiry and metadata


def test_expiry_and_get_keys_metadata_agree(share: str) -> None:
    now = int(time.time())
    c = open_perl_format(share)
    c.set("py-future", b"a", expire_on=now + 1000)
    c.set("py-past", b"b", expire_on=now - 10)
    c.set("py-never", b"c")
    perl(
        """
        my $c = opened(share_file => $ARGV[0]);
        $c->set('pl-future', 'd', { expire_on => $ARGV[1] + 2000 });
        $c->set('pl-past', 'e', { expire_on => $ARGV[1] - 5 });
        $c->set('pl-ttl', 'f', '1h');
        """,
        share, str(now),
    )
    out = perl_json(
        """
        my $c = opened(share_file => $ARGV[0]);
        my %m = map { $_->{key} => [$_->{expire_on}, $_->{last_access}] } $c->get_keys(1);
        my %g = map { $_ => (defined $c->get($_) ? 1 : 0) } qw(py-future py-past py-never pl-future pl-past pl-ttl);
        print $J->encode([\\%m, \\%g]);
        """,
        share,
    )
    perl_meta, perl_hits = out  # type: ignore[misc]
    py_meta = {
        (e["key"].decode() if isinstance(e["key"], bytes) else e["key"]): [e["expire_on"], e["last_access"]]
        for e in c.get_keys(1)
    }
    assert set(py_meta) == set(perl_meta) == {"py-future", "py-never", "pl-future", "pl-ttl"}
    for k in py_meta:
        assert py_meta[k][0] == perl_meta[k][0]
        assert abs(py_meta[k][1] - perl_meta[k][1]) <= 2  # last_access moves with each read
    assert py_meta["py-future"][0] == now + 1000 and py_meta["py-never"][0] == 0
    assert abs(py_meta["pl-ttl"][0] - (now + 3600)) <= 5
    assert perl_hits == {"py-future": 1, "py-past": 0, "py-never": 1, "pl-future": 1, "pl-past": 0, "pl-ttl": 1}
    assert c.get("pl-past") is None and c.get("py-past") is None and c.get("pl-future") == b"d"
    c.close()


# ---------------------------------------------------------------- concurrency


START_WAIT = r"""
sub wait_start { my $f = shift; select(undef, undef, undef, 0.002) until -e $f; }
"""


def test_concurrent_get_and_set_perl_and_python(share: str, tmp_path: Path) -> None:
    """t/12.t across languages: 5,000 increments each, at the same time."""
    go = tmp_path / "go"
    c = open_perl_format(share)
    c.set("counter", b"0")
    proc = subprocess.Popen(
        ["perl", "-e", PREAMBLE + START_WAIT + textwrap.dedent(
            """
            my $c = opened(share_file => $ARGV[0]);
            wait_start($ARGV[1]);
            for (1 .. 5000) { $c->get_and_set('counter', sub { return $_[1] + 1 }) }
            print "done\\n";
            """
        ), share, str(go)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    # a second Python process too, so that Python also contends with Python
    code = textwrap.dedent(
        """
        import os, sys, time, fastmmap
        c = fastmmap.Cache(sys.argv[1], format="perl", serializer="raw")
        while not os.path.exists(sys.argv[2]):
            time.sleep(0.002)
        for _ in range(2500):
            c.get_and_set("counter", lambda k, v: str(int(v) + 1))
        """
    )
    py = subprocess.Popen([sys.executable, "-c", code, share, str(go)])
    go.touch()
    for _ in range(2500):
        c.get_and_set("counter", lambda k, v: str(int(v) + 1))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert py.wait(timeout=120) == 0
    assert int(c.get("counter")) == 10_000
    assert perl_json("print $J->encode([0 + opened(share_file => $ARGV[0])->get('counter')]);", share) == [10_000]
    c.close()


def test_threads_exclude_each_other(share: str) -> None:
    c = open_perl_format(share)
    c.set("n", "0")

    def work() -> None:
        for _ in range(500):
            c.get_and_set("n", lambda k, v: str(int(v) + 1))
            with c.lock("n"):
                pass

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.get("n") == "2000"
    c.close()


def test_forked_children_get_their_own_locks(share: str) -> None:
    """A child shares its parent's file description; fcntl OFD locks would be
    shared with it unless the child reopens (it does, on its first lock)."""
    c = open_perl_format(share)
    c.set("n", "0")
    pids = []
    for _ in range(3):
        pid = os.fork()
        if pid == 0:
            try:
                for _ in range(1000):
                    c.get_and_set("n", lambda k, v: str(int(v) + 1))
            finally:
                os._exit(0)
        pids.append(pid)
    for _ in range(1000):
        c.get_and_set("n", lambda k, v: str(int(v) + 1))
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0
    assert c.get("n") == "4000"
    c.close()


CHURN_PERL = r"""
use Digest::MD5 qw(md5_hex);
sub val { my ($k, $ver, $len) = @_; my $h = md5_hex("$k:$ver:$len"); return "$k:$ver:$len:" . ("x" x $len) . ":$h"; }
sub ok { my ($k, $v) = @_; return 1 unless defined $v;
    my ($kk, $ver, $len, $pad, $h) = split /:/, $v, 5;
    return defined $h && $kk eq $k && length($pad) == $len && $h eq md5_hex("$k:$ver:$len"); }
my $c = opened(share_file => $ARGV[0], num_pages => 3, page_size => 8192);
wait_start($ARGV[1]);
srand($ARGV[3]);
my ($sets, $gets, $bad) = (0, 0, 0);
my $end = time + $ARGV[2];
while (time < $end) {
    for (1 .. 200) {
        my $k = "c" . int(rand(600));
        if (rand() < 0.5) { $c->set($k, val($k, int(rand(1e6)), int(rand(300)))); $sets++ }
        else { $bad++ unless ok($k, $c->get($k)); $gets++ }
    }
}
for my $k ($c->get_keys(0)) { $bad++ unless ok($k, $c->get($k)) }
print $J->encode([$sets, $gets, $bad]);
"""


def _py_val(k: str, ver: int, length: int) -> str:
    h = hashlib.md5(f"{k}:{ver}:{length}".encode()).hexdigest()
    return f"{k}:{ver}:{length}:" + "x" * length + f":{h}"


def _py_ok(k: str | bytes, v: object) -> bool:
    if v is None:
        return True
    if isinstance(k, bytes):
        k = k.decode()
    if isinstance(v, bytes):
        v = v.decode()
    assert isinstance(v, str)
    parts = v.split(":", 4)
    if len(parts) != 5:
        return False
    kk, ver, length, pad, h = parts
    return kk == k and len(pad) == int(length) and h == hashlib.md5(f"{k}:{ver}:{length}".encode()).hexdigest()


CHURN_PY = """
import json, os, random, sys, time
sys.path.insert(0, sys.argv[5])
import fastmmap
from test_perl_format import _py_ok, _py_val
c = fastmmap.Cache(sys.argv[1], format="perl", serializer="raw", num_pages=3, page_size=8192)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.002)
r = random.Random(int(sys.argv[4]))
sets = gets = bad = 0
end = time.time() + float(sys.argv[3])
while time.time() < end:
    for _ in range(200):
        k = f"c{r.randrange(600)}"
        if r.random() < 0.5:
            c.set(k, _py_val(k, r.randrange(10**6), r.randrange(300)))
            sets += 1
        else:
            bad += not _py_ok(k, c.get(k))
            gets += 1
for k in c.keys():
    bad += not _py_ok(k, c.get(k))
print(json.dumps([sets, gets, bad, c.repaired_pages()]))
"""


def test_mixed_churn_perl_and_python(share: str, tmp_path: Path) -> None:
    """Perl and Python processes write into three small pages at once, so
    each expunges and grows pages the other wrote: every value read on
    either side is intact, no side errors, and both see the same survivors."""
    go = tmp_path / "go"
    seconds = "4"
    # The file exists before the racers start: Perl's creation of a missing
    # file (O_EXCL) fails when another process creates it at the same time.
    open_perl_format(share, num_pages=3, page_size=8192).close()
    procs = []
    for i in range(2):
        procs.append(subprocess.Popen(
            ["perl", "-e", PREAMBLE + START_WAIT + CHURN_PERL, share, str(go), seconds, str(100 + i)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        procs.append(subprocess.Popen(
            [sys.executable, "-c", CHURN_PY, share, str(go), seconds, str(200 + i), str(Path(__file__).parent)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    time.sleep(0.5)
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
        assert not err.strip(), err.decode()  # no warnings or croaks either
        results.append(json.loads(out))
    for r in results:
        assert r[2] == 0, results  # no bad value on either side
        assert r[0] > 100 and r[1] > 100
    # Python's side repaired nothing: the pages stayed valid throughout
    assert all(r[3] == 0 for r in results if len(r) == 4)
    c = open_perl_format(share, num_pages=3, page_size=8192)
    assert c.check() == []
    py_view = {(k.decode() if isinstance(k, bytes) else k): c.get(k) for k in c.keys()}
    assert py_view and all(_py_ok(k, v) for k, v in py_view.items())
    perl_view = perl_json(
        """
        my $c = opened(share_file => $ARGV[0], num_pages => 3, page_size => 8192);
        print $J->encode({ map { $_ => $c->get($_) } $c->get_keys(0) });
        """,
        share,
    )
    assert perl_view == {k: (v.decode() if isinstance(v, bytes) else v) for k, v in py_view.items()}
    c.close()


# ---------------------------------------------------------------- eviction and the page rules


def test_python_follows_perl_slot_growth(share: str) -> None:
    """The slot table grows 89 -> 179 -> 359 ... as in Perl (reference 1.11)."""
    c = open_perl_format(share, num_pages=1, page_size=65536)
    for i in range(300):
        c.set(f"key{i}", b"v" * 100)
    data = Path(share).read_bytes()
    num_slots = int.from_bytes(data[4:8], sys.byteorder)
    assert num_slots in (359, 719, 1439, 2879)
    assert c.check() == []
    keys = perl_json(
        "my $c = opened(share_file => $ARGV[0], num_pages => 1, page_size => 65536);"
        "print $J->encode([sort $c->get_keys(0)]);", share)
    assert keys == sorted(k.decode() if isinstance(k, bytes) else k for k in c.keys())
    c.close()


def test_lru_eviction_keeps_recent(share: str) -> None:
    c = open_perl_format(share, num_pages=1, page_size=8192)
    c._set_time_override(1_700_000_000)
    for i in range(40):
        c.set(f"old{i}", b"o" * 100)
    c._set_time_override(1_700_000_100)
    for i in range(10):
        c.get(f"old{i}")  # touched: newer than the rest
    for i in range(30):
        c.set(f"new{i}", b"n" * 100)
    assert all(c.get(f"new{i}") == b"n" * 100 for i in range(25, 30))
    survivors_old = [i for i in range(40) if c.exists(f"old{i}")]
    assert set(range(10)) <= set(survivors_old) or len(survivors_old) <= 10
    assert c.check() == []
    c.close()


def test_item_too_big(share: str) -> None:
    c = open_perl_format(share, num_pages=1, page_size=4096)
    assert c.max_item_size == 4096 - 32 - 4 * 89 - 24
    assert c.set("k", b"x" * (c.max_item_size - 1)) is True
    assert c.set("k", b"x" * (c.max_item_size + 10)) is False
    assert c.get("k") == b"x" * (c.max_item_size - 1)
    c.close()


# ---------------------------------------------------------------- bad options


def test_bad_options(share: str) -> None:
    with pytest.raises(ValueError, match="format must be"):
        fastmmap.Cache(share, format="python")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pickle"):
        fastmmap.Cache(share, format="perl")
    with pytest.raises(ValueError, match="anonymous"):
        fastmmap.Cache(format="perl", serializer="raw", anonymous=True)
    with pytest.raises(ValueError, match="page_size"):
        fastmmap.Cache(share, format="perl", serializer="raw", page_size=512)
    assert not os.path.exists(share)
    c = open_perl_format(share)
    with pytest.raises(TypeError, match="bytes, str and None"):
        c.set("k", 123)
    assert len(c) == 0
    c.close()


def test_damaged_page_is_repaired_not_trusted(share: str) -> None:
    c = open_perl_format(share, num_pages=2, page_size=4096, unlink_on_exit=False)
    for i in range(20):
        c.set(f"k{i}", b"v" * 50)
    c.close()
    with open(share, "r+b") as f:
        f.seek(32)  # page 0's slot table: point every slot outside the page
        f.write(b"\xff\xff\x00\x00" * 89)
    c = open_perl_format(share, num_pages=2, page_size=4096)
    for i in range(20):
        assert c.get(f"k{i}") in (None, b"v" * 50)
    assert c.check() == []
    assert c.repaired_pages() >= 1
    c.close()


def test_cli_on_a_perl_file(share: str) -> None:
    perl("my $c = opened(share_file => $ARGV[0], num_pages => 7, page_size => 8192);"
         "$c->set(\"a$_\", \"v$_\") for 1 .. 20;", share)
    geo = ["--format", "perl", "--num-pages", "7", "--page-size", "8k"]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fastmmap", *args], capture_output=True, text=True,
                              timeout=60)

    r = cli("check", *geo, share)
    assert r.returncode == 0 and "all pages valid" in r.stdout
    r = cli("keys", *geo, share)
    assert r.returncode == 0 and len(r.stdout.split()) == 20
    r = cli("get", *geo, "--raw", share, "a7")
    assert r.returncode == 0 and r.stdout == "v7"
    # the wrong geometry is an error that says so, and the file is left alone
    r = cli("keys", "--format", "perl", share)
    assert r.returncode == 2 and "init_file" in r.stderr
    assert os.path.getsize(share) == 7 * 8192


# ---------------------------------------------------------------- the rest of the API on a Perl file


def test_write_back_and_read_through(share: str) -> None:
    store: dict[object, object] = {}
    written: list[object] = []
    c = open_perl_format(
        share, num_pages=1, page_size=4096, write_action="write_back",
        read_cb=lambda ctx, k: store.get(k.decode() if isinstance(k, bytes) else k),
        write_cb=lambda ctx, k, v, exp: written.append((k, v)),
    )
    for i in range(200):  # a 4 KiB page: most are evicted, dirty, to write_cb
        c.set(f"k{i}", b"v" * 40)
    c.empty()
    assert {k for k, _ in written} == {f"k{i}" for i in range(200)}
    store["db"] = "from the store"
    assert c.get("db") == "from the store"  # read through, then cached
    store.clear()
    assert c.get("db") == "from the store"
    c.close()


def test_dirty_flag_is_perls(share: str) -> None:
    """An entry Perl stored in write-back mode is dirty for Python too."""
    perl(
        """
        my $c = opened(share_file => $ARGV[0], num_pages => 1, page_size => 4096,
                       write_action => 'write_back', write_cb => sub {});
        $c->set('pk', 'perl-dirty');
        """,
        share,
    )
    flushed: list[tuple[object, object]] = []
    c = open_perl_format(share, num_pages=1, page_size=4096, write_action="write_back",
                         write_cb=lambda ctx, k, v, exp: flushed.append((k, v)))
    c.empty()
    assert flushed == [(b"pk", b"perl-dirty")]
    c.close()


def test_stats_counters_are_perls(share: str) -> None:
    c = open_perl_format(share, enable_stats=True)
    c.set("a", b"1")
    for _ in range(5):
        c.get("a")
    for _ in range(3):
        c.get("missing")
    assert c.get_statistics() == (8, 5)
    assert perl_json("print $J->encode([opened(share_file => $ARGV[0])->get_statistics()]);", share) == [8, 5]
    c.close()


def test_lock_blocks_and_multi(share: str) -> None:
    c = open_perl_format(share)
    with c.lock("x") as held:
        held.set(b"fresh")
        assert held.value == b"fresh"
    assert c.get("x") == b"fresh"
    c.multi_set("user1", {"name": "ann", "mail": b"a@x"})
    assert c.multi_get("user1", ["name", "mail", "nope"]) == {"name": "ann", "mail": b"a@x"}
    out = perl_json(
        "my $c = opened(share_file => $ARGV[0]);"
        "my $r = $c->multi_get('user1', ['name', 'mail']); print $J->encode($r);",
        share,
    )
    assert out == {"name": "ann", "mail": "a@x"}
    c.purge()
    c.clear()
    assert len(c) == 0 and c.check() == []
    c.close()


def test_lock_covers_exactly_the_page_bytes(share: str) -> None:
    """The lock is an exclusive fcntl lock on [page * page_size, +page_size),
    the range Perl locks: another process sees exactly that range taken."""
    c = open_perl_format(share, num_pages=4, page_size=8192)
    key = "k"
    page = _fastmmap.perl_hash(b"k") % 4
    probe = textwrap.dedent(
        """
        import fcntl, os, struct, sys
        fd = os.open(sys.argv[1], os.O_RDWR)
        out = []
        for start, length in [tuple(map(int, r.split(":"))) for r in sys.argv[2:]]:
            lk = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, start, length, 0)
            res = fcntl.fcntl(fd, fcntl.F_GETLK, lk)
            out.append(struct.unpack("hhqqi4x", res)[0] != fcntl.F_UNLCK)
        print(out)
        """
    )
    lo, hi = page * 8192, (page + 1) * 8192
    ranges = [(lo, 1), (hi - 1, 1), (lo, 8192), (0, 4 * 8192)]
    if lo:
        ranges.append((lo - 1, 1))
    if hi < 4 * 8192:
        ranges.append((hi, 1))
    with c.lock(key):
        r = subprocess.run([sys.executable, "-c", probe, share, *(f"{s}:{n}" for s, n in ranges)],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert eval(r.stdout) == [True, True, True, True] + [False] * (len(ranges) - 4)
    # and Perl, holding the page, blocks exactly that page for us
    held = subprocess.Popen(
        ["perl", "-e", PREAMBLE + textwrap.dedent(
            """
            my $c = opened(share_file => $ARGV[0], num_pages => 4, page_size => 8192);
            $c->get_and_set('k', sub { print "held\\n"; STDOUT->flush; sleep 2; return 'perl' });
            """
        ), share], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert held.stdout is not None and held.stdout.readline() == "held\n"
    t0 = time.monotonic()
    other = next(f"o{i}" for i in range(100) if _fastmmap.perl_hash(f"o{i}".encode()) % 4 != page)
    c.set(other, b"free")  # another page: no wait
    assert time.monotonic() - t0 < 1.0
    assert c.get("k") == b"perl"  # waited for Perl's store
    out, err = held.communicate(timeout=60)
    assert held.returncode == 0, err
    c.close()


def test_truncated_under_us_raises_not_crashes(share: str) -> None:
    c = open_perl_format(share, num_pages=3, page_size=8192, unlink_on_exit=False)
    for i in range(100):
        c.set(f"k{i}", b"v" * 30)
    os.truncate(share, 0)
    with pytest.raises(fastmmap.FileReplacedError):
        for i in range(100):
            c.get(f"k{i}")
    with pytest.raises(fastmmap.FileReplacedError):
        c.set("k1", b"again")
    c.close()


def test_modseq_entries_as_perl_before_163_sees_them(share: str) -> None:
    """The README's warning, checked: Perl 1.57 knows no modseq flag, so it
    reads the 8 modseq bytes as part of the value, and a tombstone as a
    value.  (Perl 1.63 reads both as Python does; Debian ships 1.57.)"""
    c = open_perl_format(share)
    assert c.set("v", b"payload", modseq=7) is True
    assert c.set("gone", b"x", modseq=1) is True
    assert c.remove("gone", modseq=2) is True
    assert c.get("gone") is None and c.get_modseq("gone") == 2 and c.get("v") == b"payload"
    out = perl_json(
        "my $c = opened(share_file => $ARGV[0]);"
        "print $J->encode([$Cache::FastMmap::VERSION, hexs($c->get('v')), hexs($c->get('gone'))]);",
        share,
    )
    version, v, gone = out  # type: ignore[misc]
    if version < "1.63":
        assert bytes.fromhex(v) == (7).to_bytes(8, sys.byteorder) + b"payload"
        assert bytes.fromhex(gone) == (2).to_bytes(8, sys.byteorder)
    else:
        assert bytes.fromhex(v) == b"payload" and gone is None
    c.close()


# ---------------------------------------------------------------- get_and_set's extended forms


def test_get_and_set_no_change_expiry_and_did_store_agree(share: str) -> None:
    """The same read-modify-write calls on both sides of one file: Perl's
    empty list and fastmmap.NO_CHANGE store nothing; ($new, $did_store) and
    with_stored=True report it; the sub's options and fastmmap.Update set,
    or keep, the entry's expire_on (Perl 1.50 and 1.53, in Debian's 1.57)."""
    now = int(time.time())
    c = open_perl_format(share)
    c.set("py-kept", b"a", expire_on=now + 500)
    c.set("py-bumped", b"a", expire_on=now + 600)
    out = perl_json(
        """
        my $c = opened(share_file => $ARGV[0]);
        my @r;
        # no change: the empty list
        push @r, [$c->get_and_set('py-kept', sub { return () })];
        push @r, [$c->get_and_set('pl-absent', sub { return () })];
        # the sub sees expire_on and passes it back: kept
        push @r, [$c->get_and_set('py-bumped', sub { my ($k, $v, $o) = @_; return ($v . 'b', { expire_on => $o->{expire_on} }) })];
        # an expire_time option from the sub, and one expire_on
        push @r, [$c->get_and_set('pl-ttl', sub { return ('t', { expire_time => '1h' }) })];
        $c->set('pl-keep', 'p', { expire_on => $ARGV[1] + 700 });
        print $J->encode(\\@r);
        """,
        share, str(now),
    )
    assert out == [["a", 0], [None, 0], ["ab", 1], ["t", 1]]

    def meta(key: str) -> int:
        [e] = [e for e in c.get_keys(1) if e["key"] in (key, key.encode())]
        return int(e["expire_on"])

    assert c.get("py-kept") == b"a" and meta("py-kept") == now + 500
    assert not c.exists("pl-absent")
    assert c.get("py-bumped") == b"ab" and meta("py-bumped") == now + 600
    assert c.get("pl-ttl") == b"t" and abs(meta("pl-ttl") - (now + 3600)) <= 5

    # and the other way: Python's calls, read by Perl
    assert c.get_and_set("pl-keep", lambda k, old: fastmmap.NO_CHANGE, with_stored=True) == (b"p", False)
    assert c.get_and_set(
        "pl-keep", lambda k, old: fastmmap.Update(old + b"q", keep_expiry=True), with_stored=True
    ) == (b"pq", True)
    assert c.get_and_set("py-ttl", lambda k, old: fastmmap.Update(b"u", expire_time="1h")) == b"u"
    out = perl_json(
        """
        my $c = opened(share_file => $ARGV[0]);
        my %m = map { $_->{key} => $_->{expire_on} } $c->get_keys(1);
        print $J->encode([$c->get('pl-keep'), $m{'pl-keep'}, $c->get('py-ttl'), $m{'py-ttl'}]);
        """,
        share,
    )
    assert out[:3] == ["pq", now + 700, "u"]  # type: ignore[index]
    assert abs(out[3] - (now + 3600)) <= 5  # type: ignore[index]
    c.close()
