"""Build fastmmap's binary wheels with one cross compiler (`zig cc`).

    python tools/build_wheels.py --out wheelhouse --python 3.11=/path/python3.11 ...

For each target (manylinux_2_28 x86_64 and aarch64, musllinux_1_2 x86_64)
and each CPython given, compile the extension with `zig cc -target ...`
against that interpreter's headers, then put it in a wheel beside the
Python files and the metadata setuptools writes for the project.

Why zig rather than the manylinux containers cibuildwheel uses: the
machine that runs `make wheels` has no container runtime; zig ships the
glibc symbol versions of every release and musl's sources, so one package
from PyPI targets glibc 2.28 and musl exactly, and links nothing newer.

The CPython headers come from the interpreter that runs on this machine
(x86_64).  They serve the aarch64 build too: CPython's headers are the same
on both, but for pyconfig.h, whose differences between two 64-bit
little-endian Linux builds of one CPython version (the x87/x64 inline
assembly switches) are read only inside the interpreter's own sources, not
by anything an extension includes.  Object sizes and layouts (SIZEOF_*,
ALIGNOF_*, Py_GIL_DISABLED, Py_DEBUG) are the same for both.

The module is stripped (-s): the wheel carries no debug information.

musllinux aarch64 is left to cibuildwheel (which tests it on an aarch64
runner): here its tests could not run, because musl initialises a robust
mutex only where get_robust_list works, and qemu-user does not emulate it.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ["csrc/fmm.c", "csrc/fmm_perl.c", "csrc/fmm_guard.c"]
BINDING = "csrc/_fastmmapmodule.c"
# setup.py's warnings and visibility; -O3 -fwrapv -DNDEBUG as a release build of
# CPython passes them to extensions.
CFLAGS = [
    "-std=gnu11",
    "-O3",
    "-fwrapv",
    "-DNDEBUG",
    "-fPIC",
    "-Wall",
    "-Wextra",
    "-Wno-missing-field-initializers",
    "-fvisibility=hidden",
    "-g0",
]

#: wheel platform tag: zig target, extension file name suffix.  The musl
#: module is named plain "_fastmmap.so", the one suffix every CPython on
#: musl accepts whatever its build called its platform triplet (the wheel's
#: cpXY tag already keeps it to one CPython version).
TARGETS = {
    "manylinux_2_28_x86_64": ("x86_64-linux-gnu.2.28", ".cpython-{v}-x86_64-linux-gnu.so"),
    "manylinux_2_28_aarch64": ("aarch64-linux-gnu.2.28", ".cpython-{v}-aarch64-linux-gnu.so"),
    "musllinux_1_2_x86_64": ("x86_64-linux-musl", ".so"),
}

#: zig links musl as "libc.so"; wheels built on Alpine (the musllinux
#: images) name it by its loader's name, which is what auditwheel and
#: installers recognise as musl.  musl's loader takes any "libc.*" name
#: for itself, so either loads on every musl system.
MUSL_SONAME = {"musllinux_1_2_x86_64": "libc.musl-x86_64.so.1"}


def run(cmd: list[str], **kw: object) -> None:
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload]


def interp_info(python: str) -> tuple[str, str]:
    """(nodot version like "311", include dir) of an interpreter."""
    out = subprocess.run(
        [
            python,
            "-c",
            "import sys, sysconfig; "
            "print(f'{sys.version_info[0]}{sys.version_info[1]}'); "
            "print(sysconfig.get_paths()['include']); "
            "print(sysconfig.get_config_var('Py_GIL_DISABLED') or 0)",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    if out[2].strip() not in ("0", ""):
        sys.exit(f"{python}: a free-threaded build; this script builds the GIL ABI only")
    return out[0].strip(), out[1].strip()


def metadata(tmp: Path) -> Path:
    """The .dist-info directory setuptools writes (no compilation)."""
    from setuptools import build_meta

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        name = build_meta.prepare_metadata_for_build_wheel(str(tmp))
    finally:
        os.chdir(cwd)
    return tmp / name


def package_files() -> list[Path]:
    """What pyproject.toml's package-data puts in the wheel: .py, .pyi, py.typed."""
    pkg = ROOT / "src"
    files = [
        p
        for p in sorted((pkg / "fastmmap").rglob("*"))
        if p.is_file() and (p.suffix in (".py", ".pyi") or p.name == "py.typed") and "__pycache__" not in p.parts
    ]
    return files


def record_line(arcname: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{arcname},sha256={digest},{len(data)}"


def write_wheel(out: Path, distinfo: Path, so_name: str, so: Path, tag: str) -> Path:
    name, version = distinfo.name[: -len(".dist-info")].split("-")
    whl = out / f"{name}-{version}-{tag}.whl"
    wheel_meta = (
        "Wheel-Version: 1.0\n"
        "Generator: fastmmap tools/build_wheels.py\n"
        "Root-Is-Purelib: false\n"
        f"Tag: {tag}\n"
    ).encode()
    records = []
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_DEFLATED) as z:

        def add(arcname: str, data: bytes, mode: int = 0o644) -> None:
            info = zipfile.ZipInfo(arcname, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (0o100000 | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
            records.append(record_line(arcname, data))

        for p in package_files():
            add(p.relative_to(ROOT / "src").as_posix(), p.read_bytes())
        add(f"fastmmap/{so_name}", so.read_bytes(), 0o755)
        di = distinfo.name
        for p in sorted(distinfo.rglob("*")):
            if p.is_file() and p.name not in ("WHEEL", "RECORD"):
                add(f"{di}/{p.relative_to(distinfo).as_posix()}", p.read_bytes())
        add(f"{di}/WHEEL", wheel_meta)
        records.append(f"{di}/RECORD,,")
        info = zipfile.ZipInfo(f"{di}/RECORD", date_time=(1980, 1, 1, 0, 0, 0))
        info.external_attr = 0o100644 << 16
        z.writestr(info, "\n".join(records) + "\n")
    return whl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="wheelhouse")
    ap.add_argument("--python", action="append", required=True, help="X.Y=/path/to/pythonX.Y (repeat)")
    ap.add_argument("--target", action="append", choices=sorted(TARGETS), help="default: all")
    ap.add_argument("--zig", default=f"{shlex.quote(sys.executable)} -m ziglang", help="the zig command")
    ap.add_argument("--patchelf", default=str(Path(sys.executable).parent / "patchelf"))
    ap.add_argument("--werror", action="store_true", help="-Werror, as CI builds")
    args = ap.parse_args()

    out = (ROOT / args.out) if not os.path.isabs(args.out) else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    zig = shlex.split(args.zig)
    cflags = CFLAGS + (["-Werror"] if args.werror else [])
    built = []
    with tempfile.TemporaryDirectory(prefix="fastmmap-wheels-") as t:
        tmp = Path(t)
        distinfo = metadata(tmp / "meta")
        for plat in args.target or sorted(TARGETS):
            target, suffix = TARGETS[plat]
            for spec in args.python:
                ver, _, python = spec.partition("=")
                nodot, include = interp_info(python)
                if f"{ver.replace('.', '')}" != nodot:
                    sys.exit(f"{python} is CPython {nodot}, not {ver}")
                so_name = "_fastmmap" + suffix.format(v=nodot)
                so = tmp / f"{plat}-{nodot}" / so_name
                so.parent.mkdir(parents=True)
                # One command compiles and links: zig caches each object,
                # so the engine is compiled once per target.
                run(
                    zig
                    + ["cc", "-target", target, "-shared", "-s"]
                    + cflags
                    + ["-Icsrc", f"-I{include}", BINDING, *ENGINE, "-o", str(so), "-lpthread"],
                    cwd=ROOT,
                )
                if plat in MUSL_SONAME:
                    run([args.patchelf, "--replace-needed", "libc.so", MUSL_SONAME[plat], str(so)])
                tag = f"cp{nodot}-cp{nodot}-{plat}"
                built.append(write_wheel(out, distinfo, so_name, so, tag))
    for w in built:
        print("built", w.relative_to(ROOT) if w.is_relative_to(ROOT) else w)


if __name__ == "__main__":
    main()
