"""A real multi-region guest memory layout and a flat model of it, shared by the memory tests.

Three memfd regions, front-end (user) addresses unrelated to guest addresses, non-zero mmap
offsets, a hole between region 0 and region 1, and regions 1 and 2 adjacent in guest space:

    gpa 0x00000-0x10000  region 0  file A at 0x2000   uva 0x7f1234500000
    gpa 0x10000-0x20000  hole
    gpa 0x20000-0x30000  region 1  file B at 0x0      uva 0x555500000000
    gpa 0x30000-0x38000  region 2  file C at 0x1000   uva 0x555500010000
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from memory import PAGE_SIZE, GuestMemory, MemoryRegion

SPACE = 0x38000
SPACE_PAGES = SPACE // PAGE_SIZE
HOLE = (0x10000, 0x20000)

# (gpa, size, uva, mmap_offset, file size)
REGION_SPECS = (
    (0x00000, 0x10000, 0x7F12_3450_0000, 0x2000, 0x12000),
    (0x20000, 0x10000, 0x5555_0000_0000, 0x0000, 0x10000),
    (0x30000, 0x08000, 0x5555_0001_0000, 0x1000, 0x09000),
)


def memfd(name: str, size: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


@dataclass
class Layout:
    mem: GuestMemory
    regions: tuple[MemoryRegion, ...]
    model: bytearray  # the guest physical space [0, SPACE); the hole stays zero

    @staticmethod
    def valid(gpa: int, n: int = 1) -> bool:
        """Whether every byte of [gpa, gpa+n) is guest memory (regions 1-2 are adjacent)."""
        if n == 0:
            return True
        return 0 <= gpa and gpa + n <= SPACE and (gpa + n <= HOLE[0] or gpa >= HOLE[1])

    def file_bytes(self, gpa: int, n: int) -> bytes:
        """Read guest memory through the files (not the mapping); one region only."""
        for r in self.regions:
            if r.guest_phys_addr <= gpa and gpa + n <= r.guest_phys_addr + r.memory_size:
                return os.pread(r.fd, n, r.mmap_offset + gpa - r.guest_phys_addr)
        raise AssertionError(f"{gpa:#x}+{n:#x} is not inside one region")

    def all_file_bytes(self) -> bytes:
        """The whole space as the files see it (hole as zeros)."""
        out = bytearray(SPACE)
        for r in self.regions:
            out[r.guest_phys_addr : r.guest_phys_addr + r.memory_size] = os.pread(
                r.fd, r.memory_size, r.mmap_offset
            )
        return bytes(out)


@contextmanager
def layout(seed: int = 0, tag: str = "layout") -> Iterator[Layout]:
    rng = random.Random(seed)
    fds: list[int] = []
    model = bytearray(SPACE)
    try:
        regions = []
        for i, (gpa, size, uva, off, file_size) in enumerate(REGION_SPECS):
            fd = memfd(f"{tag}-{i}", file_size)
            fds.append(fd)
            data = rng.randbytes(size)
            os.pwrite(fd, data, off)
            model[gpa : gpa + size] = data
            regions.append(MemoryRegion(gpa, size, uva, off, fd))
        with GuestMemory.from_regions(regions) as mem:
            yield Layout(mem, tuple(regions), model)
    finally:
        for fd in fds:
            os.close(fd)


def test_layout_model_matches_files() -> None:
    with layout(seed=1) as lay:
        assert lay.all_file_bytes() == bytes(lay.model)
        assert lay.valid(0x2FFFF, 2) and not lay.valid(0xFFFF, 2) and not lay.valid(SPACE - 1, 2)
