"""Build the C parts with cffi in API mode: ``python -m vhost_user.native.build``.

Each module is compiled in place, next to this file, with ``-Wall -Wextra -Werror`` (and
whatever ``VHOST_USER_CFLAGS`` adds, e.g. the sanitizers). ``deploy/setup.sh`` runs it; a
checkout without a compiler still works, with the pure-Python twins (``vhost_user.native``).
"""

from __future__ import annotations

import os
import shlex
import tempfile
from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent

BENCH_CDEF = """
#define VUB_RANDREAD 0
#define VUB_RANDWRITE 1
#define VUB_READ 2
#define VUB_WRITE 3
#define VUB_MAX_DEPTH 256
#define VUB_LAT_BUCKETS 512

struct vub_bench {
    uint8_t *mem;
    uint64_t mem_size;
    uint32_t qsize;
    uint32_t iodepth;
    uint64_t desc_gpa, avail_gpa, used_gpa;
    uint64_t hdr_gpa, status_gpa, data_gpa;
    int kick_fd;
    int event_idx;
    uint32_t bs;
    uint32_t rw;
    uint64_t capacity;
    double seconds;
    uint64_t seed;
    uint64_t ops, errors, bytes, kicks;
    uint64_t lat_sum_ns;
    uint64_t elapsed_ns;
    uint64_t lat_hist[VUB_LAT_BUCKETS];
};

int vub_bench_run(struct vub_bench *b);
"""


def bench_builder() -> cffi.FFI:
    ffi = cffi.FFI()
    ffi.cdef(BENCH_CDEF)
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
