"""README.rst's gunicorn/uWSGI snippet ("Its core") behaves as
examples/wsgi_counter.py, the app it summarises: the same requests give the
same statuses and counter values.  The snippet is read from the README, so
the two cannot drift apart.

Both run in a child interpreter: importing the example configures Django's
settings, which must not leak into the other tests' process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.rst"
EXAMPLE = ROOT / "examples" / "wsgi_counter.py"

# A browser's first visit asks for /favicon.ico too: it must not count.
PATHS = ["/", "/favicon.ico", "/incr", "/incr", "/value", "/nope", "/incr", "/value"]

DRIVER = textwrap.dedent(
    """
    import importlib.util, json, os, sys

    def drive(app, paths):
        out = []
        for path in paths:
            got = []
            body = b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": "GET"},
                                lambda status, headers: got.append(status)))
            status = got[0]
            # A 404's text names the endpoints, which the example has more of.
            out.append([status, body.decode() if status.startswith("200") else None])
        return out

    paths = json.loads(sys.argv[1])
    os.environ["FASTMMAP_COUNTER_CACHE"] = sys.argv[2]
    readme = {}
    exec(sys.argv[3], readme)
    os.environ["FASTMMAP_COUNTER_CACHE"] = sys.argv[4]
    spec = importlib.util.spec_from_file_location("wsgi_counter", sys.argv[5])
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    print(json.dumps([drive(readme["app"], paths), drive(example.app, paths)]))
    readme["cache"].close()
    example.cache.close()
    """
)


def readme_snippet() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("\ngunicorn and uWSGI\n==================\n", 1)[1]
    block = section.split(".. code-block:: python\n", 1)[1]
    lines = []
    for line in block.split("\n")[1:]:  # after the blank line
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    code = "\n".join(lines).strip() + "\n"
    assert "def app(environ, start_response)" in code, "the README's WSGI snippet was not found"
    return code


def test_readme_wsgi_snippet_matches_example(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(PATHS), str(tmp_path / "readme.cache"),
         readme_snippet(), str(tmp_path / "example.cache"), str(EXAMPLE)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    readme, example = json.loads(proc.stdout)
    assert readme == example
    # and what both do: only /incr counts
    assert [body for _, body in example] == [None, None, "1\n", "2\n", "2\n", None, "3\n", "3\n"]
