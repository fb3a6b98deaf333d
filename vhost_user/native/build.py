"""Build the C parts with cffi in API mode: ``python -m vhost_user.native.build``.

Each module is compiled in place, next to this file, with ``-Wall -Wextra -Werror`` (and
whatever ``VHOST_USER_CFLAGS`` adds, e.g. the sanitizers). ``deploy/setup.sh`` runs it; a
checkout without a compiler still works, with the pure-Python twins (``vhost_user.native``).
"""

from __future__ import annotations

import os
import re
import shlex
import tempfile
from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent


def cdef_of(header: Path) -> str:
    """The declarations of a C header as cffi's cdef takes them: the header is the one place
    the layout is written; its comments and #include lines are dropped."""
    text = re.sub(r"/\*.*?\*/", "", header.read_text(), flags=re.S)
    return "\n".join(line for line in text.splitlines() if not line.startswith("#include"))


def bench_builder() -> cffi.FFI:
    ffi = cffi.FFI()
    ffi.cdef(cdef_of(HERE / "bench_driver.h"))
    flags = [
        "-O2",
        "-Wall",
        "-Wextra",
        "-Werror",
        *shlex.split(os.environ.get("VHOST_USER_CFLAGS", "")),
    ]
    ffi.set_source(
        "vhost_user.native._bench_driver",
        '#include "bench_driver.h"',
        sources=[str(HERE / "bench_driver.c")],
        include_dirs=[str(HERE)],
        extra_compile_args=flags,
        extra_link_args=shlex.split(os.environ.get("VHOST_USER_LDFLAGS", "")),
    )
    return ffi


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for builder in (bench_builder,):
            ffi = builder()
            built = Path(ffi.compile(tmpdir=tmp, verbose=False))
            target = HERE / built.name
            os.replace(built, target)
            print(f"built {target.relative_to(HERE.parents[1])}")


if __name__ == "__main__":
    main()
