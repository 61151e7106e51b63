"""``.ci/check-deps`` (what ``make demo`` and ``make test`` run first) and
``.ci/APT_PACKAGES``, the one list of the Debian packages they need, which
.ci/run installs in CI and the README's Install section names."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK_DEPS = ROOT / ".ci" / "check-deps"
APT_PACKAGES = ROOT / ".ci" / "APT_PACKAGES"
README = ROOT / "README.rst"
BASH = shutil.which("bash") or "/bin/bash"


def packages(*groups: str) -> list[str]:
    out = []
    for line in APT_PACKAGES.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pkg, pkg_groups, _probe = line.split(None, 2)
            if set(pkg_groups.split(",")) & set(groups):
                out.append(pkg)
    return out


def run_check(directory: Path, *groups: str) -> subprocess.CompletedProcess[str]:
    # An empty PATH: no apt-get, so a missing package is listed, never
    # installed, whoever runs the test.
    return subprocess.run(
        [BASH, str(directory / "check-deps"), *groups],
        capture_output=True, text=True, timeout=120, env={"PATH": ""},
    )


@pytest.fixture
def fake_ci(tmp_path: Path) -> Path:
    shutil.copy(CHECK_DEPS, tmp_path / "check-deps")
    (tmp_path / "APT_PACKAGES").write_text(
        "# package groups probe\n"
        "\n"
        "there-pkg     build        true\n"
        "gone-pkg      build        test -e /nonexistent/gone\n"
        "gone-test     test         false\n"
        "gone-both     build,fuzz   [ -n \"\" ]\n"
        "there-fuzz    fuzz         :\n"
    )
    return tmp_path


def test_missing_packages_are_listed_and_stop(fake_ci: Path) -> None:
    proc = run_check(fake_ci, "build")
    assert proc.returncode == 1
    assert "missing for build: gone-pkg gone-both" in proc.stderr
    assert "apt-get install gone-pkg gone-both\n" in proc.stderr
    proc = run_check(fake_ci, "build", "test")
    assert proc.returncode == 1
    assert "missing for build test: gone-pkg gone-test gone-both" in proc.stderr


def test_nothing_missing_passes(fake_ci: Path) -> None:
    (fake_ci / "APT_PACKAGES").write_text("there-pkg build true\nthere-too build,test :\ngone fuzz false")
    proc = run_check(fake_ci, "build", "test")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_usage_without_a_group(fake_ci: Path) -> None:
    proc = run_check(fake_ci)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_every_line_has_groups_and_a_probe() -> None:
    known = {"build", "test", "fuzz", "wheels", "ft"}
    for line in APT_PACKAGES.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            fields = line.split(None, 2)
            assert len(fields) == 3, line
            assert set(fields[1].split(",")) <= known, line


def test_readme_lists_what_make_test_needs() -> None:
    text = README.read_text(encoding="utf-8")
    install = text.split("\nInstall\n=======\n", 1)[1].split("\n=====", 1)[0]
    command = re.search(r"sudo apt-get install ((?:.|\\\n)+?)\n\n", install)
    assert command, "the README's Install section has no apt-get command"
    listed = command.group(1).replace("\\\n", " ").split()
    assert sorted(listed) == sorted(packages("build", "test"))

