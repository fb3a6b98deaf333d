"""The external contract of ``memory``: only the names the issue lists, used the way another
package (or an outside check) would, on memory built from real memfd regions with user
addresses unlike guest addresses, a hole between two regions and a non-zero mmap_offset."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import memory
from memory import (
    PAGE_SIZE,
    AccessError,
    BounceBuffer,
    GuestMemory,
    GuestMemoryError,
    MemoryAccessError,
    MemoryRegion,
    OutOfRangeError,
    PagedRange,
    ReadOnlyError,
    RequestBuffers,
    paged_range_from_buffers,
)

CONTRACT = {
    "PAGE_SIZE",
    "MemoryRegion",
    "GuestMemory",
    "GuestMemoryError",
    "PagedRange",
    "paged_range_from_buffers",
    "RequestBuffers",
    "LockedIoBuffers",
    "BounceBuffer",
    "AccessError",
    "OutOfRangeError",
    "ReadOnlyError",
    "MemoryAccessError",
    "AddressRange",
    "MultiRequestBuffers",
    "request_buffers_from_buffers",
    "IoBuffers",
}

# Region A: gpa 0x100000, 64 KiB at file offset 0x3000, uva 0x7fff00000000.
# Hole: 0x110000-0x200000. Region B: gpa 0x200000, 32 KiB at file offset 0, uva 0x10000.
A_GPA, A_SIZE, A_OFF, A_UVA = 0x100000, 0x10000, 0x3000, 0x7FFF_0000_0000
B_GPA, B_SIZE, B_OFF, B_UVA = 0x200000, 0x8000, 0x0, 0x10000


@pytest.fixture
def guest() -> Iterator[tuple[GuestMemory, int, int]]:
    fa = os.memfd_create("contract-a")
    fb = os.memfd_create("contract-b")
    os.ftruncate(fa, A_OFF + A_SIZE)
    os.ftruncate(fb, B_SIZE)
    try:
        regions = [
            MemoryRegion(A_GPA, A_SIZE, A_UVA, A_OFF, fa),
            MemoryRegion(B_GPA, B_SIZE, B_UVA, B_OFF, fb),
        ]
        with GuestMemory.from_regions(regions) as mem:
            yield mem, fa, fb
    finally:
        os.close(fa)
        os.close(fb)


def test_exports() -> None:
    assert CONTRACT <= set(dir(memory))
    assert PAGE_SIZE == 4096
    assert issubclass(OutOfRangeError, AccessError)
    assert issubclass(ReadOnlyError, AccessError)
    assert issubclass(MemoryAccessError, AccessError)
    region = MemoryRegion(0, 4096, 0, 0, 3)
    with pytest.raises(AttributeError):
        region.fd = 4  # type: ignore[misc]


def test_end_to_end(guest: tuple[GuestMemory, int, int]) -> None:
    mem, fa, fb = guest
    # Flat access lands at mmap_offset in the right file.
    mem.write_at(A_GPA + 0x10, b"head")
    assert os.pread(fa, 4, A_OFF + 0x10) == b"head"
    assert mem.translate_uva(A_UVA + 0x10, 4) == A_GPA + 0x10
    assert mem.translate_uva(B_UVA, 16) == B_GPA
    with pytest.raises(GuestMemoryError) as info:
        mem.read_at(A_GPA + A_SIZE, 1)
    assert info.value.gpa == A_GPA + A_SIZE and info.value.kind

    # A chain: 0x800 bytes at the end of region A, then two pages of region B.
    chain = [(A_GPA + A_SIZE - 0x800, 0x800), (B_GPA, 2 * PAGE_SIZE)]
    r = paged_range_from_buffers(chain)
    assert r is not None
    assert (len(r), r.offset(), r.gpns()) == (0x2800, 0x800, (0x10F, 0x200, 0x201))
    assert [(a.start, a.end) for a in r.ranges()] == [
        (A_GPA + A_SIZE - 0x800, A_GPA + A_SIZE),
        (B_GPA, B_GPA + 2 * PAGE_SIZE),
    ]

    disk_read = RequestBuffers(mem, r, is_write=True)
    assert disk_read.is_aligned(512) and not disk_read.is_aligned(4096)
    w = disk_read.writer()
    w.write(b"\x11" * 0x800)
    w.fill(0x22, PAGE_SIZE)
    w.zero(PAGE_SIZE)
    assert len(w) == 0
    with pytest.raises(OutOfRangeError):
        w.write(b"x")
    assert os.pread(fa, 0x800, A_OFF + A_SIZE - 0x800) == b"\x11" * 0x800
    assert os.pread(fb, 2 * PAGE_SIZE, 0) == b"\x22" * PAGE_SIZE + bytes(PAGE_SIZE)

    with disk_read.lock(True) as locked:
        vecs = locked.io_vecs()
        assert [len(v) for v in vecs] == [0x800, 2 * PAGE_SIZE]
        vecs[1][0] = 0x33
    assert os.pread(fb, 1, 0) == b"\x33"

    disk_write = RequestBuffers(mem, r, is_write=False)
    assert len(disk_write.writer()) == 0
    with pytest.raises(ReadOnlyError):
        disk_write.writer().write(b"x")
    with pytest.raises(ReadOnlyError):
        disk_write.lock(True)
    reader = disk_write.reader()
    assert reader.read(0x801) == b"\x11" * 0x800 + b"\x33"
    assert len(reader) == 0x2800 - 0x801

    bounce = BounceBuffer(len(disk_write))
    disk_write.reader().readinto(bounce.as_mut_bytes())
    assert bytes(bounce.io_vecs()[0][0x800:0x802]) == b"\x33\x22"


def test_hostile_page_numbers(guest: tuple[GuestMemory, int, int]) -> None:
    mem, _, _ = guest
    for gpn in (0, 0x110, 0x1FF, 0x208, 1 << 52, 1 << 80, -1):
        rb = RequestBuffers(mem, PagedRange(0, PAGE_SIZE, [gpn]), is_write=True)
        with pytest.raises(MemoryAccessError) as info:
            rb.reader().read(1)
        assert isinstance(info.value.__cause__, GuestMemoryError)
        with pytest.raises(AccessError):
            rb.lock(True)
        with pytest.raises(AccessError):
            rb.writer().zero(PAGE_SIZE)
    assert os.pread(guest[1], 16, A_OFF) == bytes(16)
