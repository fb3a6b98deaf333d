"""Build blkdev's C parts with cffi in API mode: ``python -m blkdev.native.build``.

Like ``vhost_user.native.build`` (same flags, ``VHOST_USER_CFLAGS`` adds the sanitizers);
``deploy/setup.sh`` runs both. Two modules: the virtio-blk fast path (without it the device
serves every request in Python) and the librbd shim (needs librbd-dev and librados-dev; without
it ``rbd:`` images cannot be served, and say so). ``--only fast|rbd`` builds one.
"""

from __future__ import annotations

import argparse
import os
import shlex
import tempfile
from pathlib import Path

import cffi

from vhost_user.native.build import cdef_of

HERE = Path(__file__).resolve().parent


def _builder(module: str, stem: str, *, libraries: tuple[str, ...] = ()) -> cffi.FFI:
    """``stem.h`` declared to cffi, ``stem.c`` compiled into ``blkdev.native.<module>``."""
    ffi = cffi.FFI()
    ffi.set_source(
        f"blkdev.native.{module}",
        f'#include "{stem}.h"',
        sources=[str(HERE / f"{stem}.c")],
        include_dirs=[str(HERE)],
        libraries=list(libraries),
        extra_compile_args=[
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            *shlex.split(os.environ.get("VHOST_USER_CFLAGS", "")),
        ],
        extra_link_args=shlex.split(os.environ.get("VHOST_USER_LDFLAGS", "")),
    )
    return ffi


def fast_builder() -> cffi.FFI:
    ffi = _builder("_blk_fast", "blk_fast")
    ffi.cdef(cdef_of(HERE / "blk_fast.h"))
    return ffi


def rbd_builder() -> cffi.FFI:
    ffi = _builder("_rbd", "rbd_shim", libraries=("rbd", "rados"))
    # struct iovec comes from <sys/uio.h>; cffi checks the layout against it ("...").
    ffi.cdef("struct iovec { void *iov_base; size_t iov_len; ...; };")
    ffi.cdef(cdef_of(HERE / "rbd_shim.h"))
    return ffi


BUILDERS = {"fast": fast_builder, "rbd": rbd_builder}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(BUILDERS))
    args = parser.parse_args()
    for name, builder in BUILDERS.items():
        if args.only not in (None, name):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            built = Path(builder().compile(tmpdir=tmp, verbose=False))
            target = HERE / built.name
            os.replace(built, target)
            print(f"built {target.relative_to(HERE.parents[1])}")


if __name__ == "__main__":
    main()
