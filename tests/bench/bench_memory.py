"""Microbenchmark of the per-I/O costs of the memory package.

Run: ``python tests/bench/bench_memory.py`` from the repository root. Prints, per case, the
median over several repeats of the cost of one operation in microseconds. The headline figure
is "build + lock + io_vecs": what every virtio-blk request pays before its preadv/pwritev.
"""

from __future__ import annotations

import os
import sys
import timeit
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from memory import (
    PAGE_SIZE,
    GuestMemory,
    IoBuffers,
    MemoryRegion,
    RequestBuffers,
    paged_range_from_buffers,
    request_buffers_from_buffers,
)

MiB = 1 << 20


def per_op_us(fn: Callable[[], object], number: int = 20000, repeat: int = 5) -> float:
    times = timeit.repeat(fn, number=number, repeat=repeat)
    return sorted(times)[len(times) // 2] / number * 1e6


def main() -> None:
    # Two memfd regions as QEMU sends them (low RAM, then RAM above a hole), user addresses
    # unlike guest addresses, a non-zero mmap_offset.
    fd = os.memfd_create("bench-memory")
    os.ftruncate(fd, 64 * MiB)
    regions = [
        MemoryRegion(0x0, 16 * MiB, 0x7F00_0000_0000, 0, fd),
        MemoryRegion(0x1_0000_0000, 32 * MiB, 0x7F00_1000_0000, 16 * MiB, fd),
    ]
    base = 0x1_0000_0000 + MiB
    cases: dict[str, list[tuple[int, int]]] = {
        "4 KiB, 1 descriptor": [(base, 4 * 1024)],
        "128 KiB, 1 descriptor": [(base, 128 * 1024)],
        "128 KiB, 32 scattered pages": [(base + i * 3 * PAGE_SIZE, PAGE_SIZE) for i in range(32)],
        "128 KiB, 4 unaligned pieces": [(base + i * 64 * 1024 + 512, 32 * 1024) for i in range(4)],
    }
    print(f"python {sys.version.split()[0]}; microseconds per operation (median of 5)")
    with GuestMemory.from_regions(regions) as mem:
        for name, buffers in cases.items():
            rb = request_buffers_from_buffers(mem, buffers, True)

            def build(buffers: list[tuple[int, int]] = buffers) -> object:
                return request_buffers_from_buffers(mem, buffers, True)

            def lock(rb: IoBuffers = rb) -> object:
                with rb.lock(True) as locked:
                    return locked.io_vecs()

            def everything(buffers: list[tuple[int, int]] = buffers) -> object:
                rb = request_buffers_from_buffers(mem, buffers, True)
                with rb.lock(True) as locked:
                    return locked.io_vecs()

            kind = type(rb).__name__
            print(
                f"{name:30} {kind:20} build {per_op_us(build):6.2f}  lock {per_op_us(lock):6.2f}"
                f"  build + lock + io_vecs {per_op_us(everything):6.2f}"
            )
        single = [(base, 128 * 1024)]

        def seed_style() -> object:
            r = paged_range_from_buffers(single)
            assert r is not None
            with RequestBuffers(mem, r, True).lock(True) as locked:
                return locked.io_vecs()

        header = request_buffers_from_buffers(mem, [(base, 16)], False)
        big = request_buffers_from_buffers(mem, [(base, 128 * 1024)], True)
        payload = bytes(128 * 1024)
        extras: list[tuple[str, Callable[[], object], int]] = [
            ("RequestBuffers(paged_range_from_buffers(...)) + lock, 128 KiB", seed_style, 20000),
            ("reader().read(16) (virtio-blk header)", lambda: header.reader().read(16), 20000),
            ("read_at(gpa, 16)", lambda: mem.read_at(base, 16), 20000),
            ("read_u16 (ring index)", lambda: mem.read_u16(base), 20000),
            ("write_u16", lambda: mem.write_u16(base, 7), 20000),
            ("read_u64", lambda: mem.read_u64(base), 20000),
            ("writer().write(128 KiB) (a bounce copy)", lambda: big.writer().write(payload), 2000),
        ]
        for label, fn, number in extras:
            print(f"{label:64} {per_op_us(fn, number=number):6.2f}")
        dirty_logging(mem, base)
    os.close(fd)


def dirty_logging(mem: GuestMemory, base: int) -> None:
    """What a read request pays for live migration's dirty log: its data buffers locked for
    writing (reported on release) and its status byte, with logging off (no hook: one
    attribute test per write) and on (memory.dirty_log marking the pages), side by side."""
    from memory.dirty_log import VHOST_LOG_PAGE, DirtyLog

    log_fd = os.memfd_create("bench-dirty-log")
    size = (0x1_0000_0000 + 32 * MiB) // VHOST_LOG_PAGE // 8
    os.ftruncate(log_fd, size)
    log = DirtyLog(log_fd, size, 0)
    cases = {
        "4 KiB read": [(base, 4 * 1024)],
        "128 KiB read": [(base, 128 * 1024)],
        "128 KiB read, 32 scattered pages": [
            (base + i * 3 * PAGE_SIZE, PAGE_SIZE) for i in range(32)
        ],
    }
    print("dirty logging: lock for write + release + status byte (us per request)")
    for name, buffers in cases.items():

        def request(buffers: list[tuple[int, int]] = buffers) -> object:
            rb = request_buffers_from_buffers(mem, buffers, True)
            with rb.lock(False) as locked:
                locked.io_vecs()
            mem.write_at(base - 1, b"\0")
            return rb

        off = per_op_us(request)
        mem.writes.install(log.mark)
        try:
            on = per_op_us(request)
        finally:
            mem.writes.remove()
        off_again = per_op_us(request)
        print(f"  {name:34} off {off:6.2f}  on {on:6.2f}  off again {off_again:6.2f}")
    log.close()
    os.close(log_fd)


if __name__ == "__main__":
    main()
