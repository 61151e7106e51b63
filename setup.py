"""Build the C extension; all other metadata is in pyproject.toml.

Environment toggles (set to 1):
  FASTMMAP_DEBUG     -O0 -g -UNDEBUG (asserts on)
  FASTMMAP_SANITIZE  AddressSanitizer + UndefinedBehaviorSanitizer; run with
                     LD_PRELOAD=$(gcc -print-file-name=libasan.so)
                     PYTHONMALLOC=malloc ASAN_OPTIONS=detect_leaks=0
  FASTMMAP_COVERAGE  gcov instrumentation (--coverage)
  FASTMMAP_WERROR    -Werror (CI)
"""

import glob
import os

from setuptools import Extension, setup


def _flag(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "no", "false", "off")


extra_compile_args = [
    "-std=gnu11",
    "-Wall",
    "-Wextra",
    # PyType_Slot / PyMethodDef / PyModuleDef tables end with {0} sentinels.
    "-Wno-missing-field-initializers",
    "-fvisibility=hidden",
]
extra_link_args = []

if _flag("FASTMMAP_DEBUG"):
    extra_compile_args += ["-O0", "-g", "-UNDEBUG"]
if _flag("FASTMMAP_SANITIZE"):
    san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    extra_compile_args += san
    extra_link_args += san
if _flag("FASTMMAP_COVERAGE"):
    extra_compile_args += ["--coverage"]
    extra_link_args += ["--coverage"]
if _flag("FASTMMAP_WERROR"):
    extra_compile_args += ["-Werror"]

# Each combination of toggles builds in its own directory: setuptools reuses
# object files it finds in build/, so a sanitizer build must never meet the
# objects of a plain one (or the reverse).
variant = "-".join(
    name.split("_", 1)[1].lower()
    for name in ("FASTMMAP_DEBUG", "FASTMMAP_SANITIZE", "FASTMMAP_COVERAGE")
    if _flag(name)
) or "plain"

setup(
    options={"build": {"build_base": os.path.join("build", "setuptools-" + variant)}},
    ext_modules=[
        Extension(
            "fastmmap._fastmmap",
            sources=["csrc/_fastmmapmodule.c", "csrc/fmm.c", "csrc/fmm_perl.c", "csrc/fmm_guard.c"],
            include_dirs=["csrc"],
            libraries=["pthread"],
            depends=sorted(glob.glob("csrc/*.h")),
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    ],
)
