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

HERE = Path(__file__).resolve().parent

FAST_CDEF = """
#define VUB_FAST_MAX_REGIONS 64
#define VUB_FAST_MAX_SEGS 128
#define VUB_FAST_LAT_BOUNDS 22

struct vub_region {
    uint64_t gpa;
    uint64_t size;
    uint8_t *host;
};

struct vub_fast {
    struct vub_region regions[VUB_FAST_MAX_REGIONS];
    uint32_t nregions;
    uint8_t *desc;
    uint8_t *avail;
    uint8_t *used;
    uint32_t size;
    uint16_t next_avail;
    uint16_t shadow_avail;
    uint16_t used_idx;
    int event_idx;
    uint16_t signalled_used;
    int signalled_valid;
    uint64_t poll_ns;
    int busy;
    uint8_t *inflight;
    uint64_t inflight_counter;
    int fd;
    int punt_writes;
    uint64_t guard_sectors;
    uint32_t direct_align;
    uint64_t capacity_sectors;
    uint32_t max_bytes;
    uint32_t max_segs;
    uint64_t reads, writes, bytes_read, bytes_written, io_errors, lat_sum_ns;
    uint64_t lat_bounds_ns[VUB_FAST_LAT_BOUNDS];
    uint64_t lat_buckets[VUB_FAST_LAT_BOUNDS + 1];
};

int vub_fast_serve(struct vub_fast *f, uint32_t budget, int *punt, int *notify);
"""


def fast_builder() -> cffi.FFI:
    ffi = cffi.FFI()
    ffi.cdef(FAST_CDEF)
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
