"""Build blkdev's C parts with cffi in API mode: ``python -m blkdev.native.build``.

Like ``vhost_user.native.build`` (same flags, ``VHOST_USER_CFLAGS`` adds the sanitizers);
``deploy/setup.sh`` runs both. Without them the device serves every request in Python.
"""

from __future__ import annotations

import os
import shlex
import tempfile
from pathlib import Path

import cffi

from vhost_user.native.build import cdef_of

HERE = Path(__file__).resolve().parent


def fast_builder() -> cffi.FFI:
    ffi = cffi.FFI()
    ffi.cdef(cdef_of(HERE / "blk_fast.h"))
    extra = shlex.split(os.environ.get("VHOST_USER_CFLAGS", ""))
    ffi.set_source(
        "blkdev.native._blk_fast",
        '#include "blk_fast.h"',
        sources=[str(HERE / "blk_fast.c")],
        include_dirs=[str(HERE)],
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", *extra],
        extra_link_args=shlex.split(os.environ.get("VHOST_USER_LDFLAGS", "")),
    )
    return ffi


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ffi = fast_builder()
        built = Path(ffi.compile(tmpdir=tmp, verbose=False))
        target = HERE / built.name
        os.replace(built, target)
        print(f"built {target.relative_to(HERE.parents[1])}")


if __name__ == "__main__":
    main()
