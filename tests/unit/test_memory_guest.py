"""GuestMemory: mapping real memfd regions, validation, flat and fixed-width access, close."""

from __future__ import annotations

import gc
import os
import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memory import (
    PAGE_SIZE,
    AccessError,
    GuestMemory,
    GuestMemoryError,
    GuestMemoryErrorKind,
    IoBuffers,
    MemoryRegion,
    PagedRange,
    RequestBuffers,
    request_buffers_from_buffers,
)
from tests.unit.test_memory_support import HOLE, SPACE, Layout, layout, memfd


@pytest.fixture
def lay() -> Iterator[Layout]:
    with layout(seed=7, tag="guest") as lay:
        yield lay


def mapped_memfd_names() -> set[str]:
    """memfd names currently mapped into this process (from /proc/self/maps)."""
    names = set()
    with open("/proc/self/maps") as f:
        for line in f:
            if "/memfd:" in line:
                names.add(line.split("/memfd:", 1)[1].split(" (deleted)")[0].strip())
    return names


# -- flat access on the real layout ------------------------------------------------------


def test_reads_see_file_contents_at_mmap_offset(lay: Layout) -> None:
    assert lay.mem.read_at(0x0, 16) == lay.file_bytes(0x0, 16)
    assert lay.mem.read_at(0x0, 4) == os.pread(lay.regions[0].fd, 4, 0x2000)
    assert lay.mem.read_at(0x30010, 8) == os.pread(lay.regions[2].fd, 8, 0x1010)


def test_writes_reach_the_file(lay: Layout) -> None:
    lay.mem.write_at(0x20FFE, b"\x01\x02\x03\x04")
    assert os.pread(lay.regions[1].fd, 4, 0xFFE) == b"\x01\x02\x03\x04"
    os.pwrite(lay.regions[2].fd, b"hello", 0x1000 + 0x7FFB)
    assert lay.mem.read_at(0x37FFB, 5) == b"hello"


@pytest.mark.parametrize(
    ("gpa", "n"),
    [
        (HOLE[0], 1),  # first byte of the hole
        (HOLE[0] - 2, 4),  # runs from region 0 into the hole
        (HOLE[1] - 1, 2),  # runs from the hole into region 1
        (0x2FFFF, 2),  # spans adjacent regions 1 and 2: not one region
        (SPACE - 1, 2),  # runs past the end of guest memory
        (SPACE, 1),
        (1 << 64, 1),
        (-1, 1),
    ],
)
def test_access_not_inside_one_region_fails(lay: Layout, gpa: int, n: int) -> None:
    for op in (
        lambda: lay.mem.read_at(gpa, n),
        lambda: lay.mem.write_at(gpa, b"\xaa" * n),
    ):
        with pytest.raises(GuestMemoryError) as info:
            op()
        assert info.value.kind is GuestMemoryErrorKind.OUT_OF_RANGE
        assert info.value.gpa == gpa
    assert lay.all_file_bytes() == bytes(lay.model)


@pytest.mark.parametrize("gpa", [0, HOLE[0], SPACE + 12345, 1 << 80, -5])
def test_zero_length_access_succeeds_anywhere(lay: Layout, gpa: int) -> None:
    assert lay.mem.read_at(gpa, 0) == b""
    lay.mem.write_at(gpa, b"")


def test_fixed_width_little_endian(lay: Layout) -> None:
    m = lay.mem
    m.write_u16(0x20000, 0xBEEF)
    m.write_u32(0x20002, 0x01234567)
    m.write_u64(0x37FF8, 0x1122334455667788)
    assert lay.file_bytes(0x20000, 6) == bytes.fromhex("efbe67452301")
    assert lay.file_bytes(0x37FF8, 8) == bytes.fromhex("8877665544332211")
    assert (m.read_u16(0x20000), m.read_u32(0x20002), m.read_u64(0x37FF8)) == (
        0xBEEF,
        0x01234567,
        0x1122334455667788,
    )
    assert m.read_u16(0x20001) == 0x67BE


@pytest.mark.parametrize(("method", "size"), [("u16", 2), ("u32", 4), ("u64", 8)])
def test_fixed_width_bounds(lay: Layout, method: str, size: int) -> None:
    read = getattr(lay.mem, f"read_{method}")
    write = getattr(lay.mem, f"write_{method}")
    for gpa in (HOLE[0] - size + 1, HOLE[0], SPACE - size + 1, 0x30000 - 1, -1, 1 << 64):
        with pytest.raises(GuestMemoryError) as info:
            read(gpa)
        assert (info.value.kind, info.value.gpa) == (GuestMemoryErrorKind.OUT_OF_RANGE, gpa)
        with pytest.raises(GuestMemoryError):
            write(gpa, 0)
    assert read(HOLE[0] - size) == int.from_bytes(lay.model[HOLE[0] - size : HOLE[0]], "little")
    with pytest.raises(ValueError):
        write(0, 1 << (8 * size))
    with pytest.raises(ValueError):
        write(0, -1)
    assert lay.all_file_bytes() == bytes(lay.model)


def test_translate_uva(lay: Layout) -> None:
    m = lay.mem
    assert m.translate_uva(0x7F12_3450_0000, 16) == 0x0
    assert m.translate_uva(0x5555_0000_0010, 0x100) == 0x20010
    assert m.translate_uva(0x5555_0001_7FF0, 0x10) == 0x37FF0
    with pytest.raises(GuestMemoryError):
        m.translate_uva(0x5555_0000_FFF0, 0x20)  # spans regions 1 and 2: not one region
    with pytest.raises(GuestMemoryError):
        m.translate_uva(0x20000, 4)  # a guest address is not a user address
    with pytest.raises(GuestMemoryError):
        m.translate_uva(0x7F12_3451_0000, 1)


def test_regions_property(lay: Layout) -> None:
    assert lay.mem.regions == lay.regions


@settings(max_examples=200, deadline=None)
@given(gpa=st.integers(-0x1000, SPACE + 0x1000), n=st.integers(0, 0x11000))
def test_flat_access_matches_model(gpa: int, n: int) -> None:
    with layout(seed=gpa & 0xFF, tag="flat") as lay:
        region_ok = n == 0 or any(
            r.guest_phys_addr <= gpa and gpa + n <= r.guest_phys_addr + r.memory_size
            for r in lay.regions
        )
        if region_ok:
            assert lay.mem.read_at(gpa, n) == bytes(lay.model[gpa : gpa + n])
            data = bytes((gpa + i) & 0xFF for i in range(n))
            lay.mem.write_at(gpa, data)
            lay.model[gpa : gpa + n] = data
        else:
            with pytest.raises(GuestMemoryError):
                lay.mem.read_at(gpa, n)
            with pytest.raises(GuestMemoryError):
                lay.mem.write_at(gpa, bytes(n))
        assert lay.all_file_bytes() == bytes(lay.model)


# -- validation ----------------------------------------------------------------------------


@pytest.fixture
def fd() -> Iterator[int]:
    fd = memfd("validation", 0x10000)
    yield fd
    os.close(fd)


def test_valid_single_region(fd: int) -> None:
    with GuestMemory.from_regions([MemoryRegion(0x1000, 0x10000, 0x9000, 0, fd)]) as m:
        m.write_at(0x1000, b"ok")
        assert os.pread(fd, 2, 0) == b"ok"


BAD_TABLES = {
    "size not page multiple": [(0, 0x1800, 0, 0)],
    "zero size": [(0, 0, 0, 0)],
    "gpa misaligned": [(0x800, 0x1000, 0, 0)],
    "uva misaligned": [(0, 0x1000, 0x10, 0)],
    "gpa overflow": [(2**64 - 0x1000, 0x2000, 0, 0)],
    "uva overflow": [(0, 0x2000, 2**64 - 0x1000, 0)],
    "negative gpa": [(-0x1000, 0x1000, 0, 0)],
    "negative offset": [(0, 0x1000, 0, -0x1000)],
    "huge offset": [(0, 0x1000, 0, 2**63)],
    "gpa overlap": [(0, 0x2000, 0, 0), (0x1000, 0x1000, 0x10000, 0)],
    "uva overlap": [(0, 0x2000, 0x10000, 0), (0x10000, 0x1000, 0x11000, 0)],
    "same region twice": [(0, 0x1000, 0, 0), (0, 0x1000, 0, 0)],
}


@pytest.mark.parametrize("table", BAD_TABLES.values(), ids=BAD_TABLES.keys())
def test_invalid_tables_rejected(fd: int, table: list[tuple[int, int, int, int]]) -> None:
    with pytest.raises(GuestMemoryError) as info:
        GuestMemory.from_regions([MemoryRegion(g, s, u, o, fd) for g, s, u, o in table])
    assert info.value.kind is GuestMemoryErrorKind.INVALID_REGION


@pytest.mark.parametrize(("offset", "size"), [(0, 0x11000), (0x1000, 0x10000), (0xF000, 0x2000)])
def test_region_past_end_of_file_rejected(fd: int, offset: int, size: int) -> None:
    with pytest.raises(GuestMemoryError) as info:
        GuestMemory.from_regions([MemoryRegion(0, size, 0, offset, fd)])
    assert info.value.kind is GuestMemoryErrorKind.FILE_TOO_SMALL


def test_region_exactly_at_end_of_file_accepted(fd: int) -> None:
    with GuestMemory.from_regions([MemoryRegion(0, 0x1000, 0, 0xF000, fd)]) as m:
        m.write_at(0xFFF, b"z")
        assert os.pread(fd, 1, 0xFFFF) == b"z"


def test_non_file_fds_rejected() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(GuestMemoryError) as info:
            GuestMemory.from_regions([MemoryRegion(0, 0x1000, 0, 0, r)])
        assert info.value.kind is GuestMemoryErrorKind.FILE_TOO_SMALL
    finally:
        os.close(r)
        os.close(w)
    closed = memfd("closed", 0x1000)
    os.close(closed)
    with pytest.raises(GuestMemoryError) as info:
        GuestMemory.from_regions([MemoryRegion(0, 0x1000, 0, 0, closed)])
    assert info.value.kind is GuestMemoryErrorKind.MAP_FAILED
    with pytest.raises(GuestMemoryError) as info:  # no such fd, and too large for a C int
        GuestMemory.from_regions([MemoryRegion(0, 0x1000, 0, 0, 2**40)])
    assert info.value.kind is GuestMemoryErrorKind.MAP_FAILED


def test_sealable_memfd_is_sealed_against_shrinking() -> None:
    """Truncating a mapped file makes the next access SIGBUS: a memfd that allows sealing is
    sealed before its size is checked, so the check stays true. It may still grow."""
    fd = os.memfd_create("sealable", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    plain = memfd("unsealable", 0x2000)
    try:
        os.ftruncate(fd, 0x2000)
        regions = [
            MemoryRegion(0, 0x2000, 0x10000, 0, fd),
            MemoryRegion(0x4000, 0x2000, 0, 0, plain),
        ]
        with GuestMemory.from_regions(regions) as mem:
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0x1000)
            os.ftruncate(fd, 0x3000)
            mem.write_at(0x1FFF, b"x")
            assert mem.read_at(0x1FFF, 1) == b"x"
            assert mem.read_at(0x5FFF, 1) == b"\0"  # the unsealable one still maps
    finally:
        os.close(fd)
        os.close(plain)


def test_write_at_takes_a_strided_view() -> None:
    with GuestMemory.allocate(0x1000) as mem:
        mem.write_at(0x10, memoryview(bytearray(b"abcdefgh"))[::2])
        assert mem.read_at(0x10, 5) == b"aceg\0"


def test_failed_map_leaves_nothing_mapped() -> None:
    good = memfd("nothing-left-good", 0x2000)
    rw = memfd("nothing-left-ro", 0x2000)
    ro = os.open(f"/proc/self/fd/{rw}", os.O_RDONLY)  # mmap shared RW of this: EACCES
    try:
        with pytest.raises(GuestMemoryError) as info:
            GuestMemory.from_regions(
                [MemoryRegion(0, 0x2000, 0, 0, good), MemoryRegion(0x2000, 0x2000, 0x2000, 0, ro)]
            )
        assert info.value.kind is GuestMemoryErrorKind.MAP_FAILED
        assert info.value.gpa == 0x2000
        gc.collect()
        assert "nothing-left-good" not in mapped_memfd_names()
    finally:
        for f in (good, rw, ro):
            os.close(f)


def test_empty_table_is_memory_with_nothing_in_it() -> None:
    with GuestMemory.from_regions([]) as m:
        with pytest.raises(GuestMemoryError):
            m.read_u16(0)
        assert m.read_at(0, 0) == b""


def test_allocate() -> None:
    with GuestMemory.allocate(5000) as m:
        assert m.regions == (MemoryRegion(0, 2 * PAGE_SIZE, 0, 0, -1),)
        assert m.read_at(0, 2 * PAGE_SIZE) == bytes(2 * PAGE_SIZE)
        assert m.translate_uva(0x100, 8) == 0x100
        with pytest.raises(GuestMemoryError):
            m.read_at(2 * PAGE_SIZE - 1, 2)
    for bad in (0, -4096):
        with pytest.raises(ValueError):
            GuestMemory.allocate(bad)


# -- close ---------------------------------------------------------------------------------


def test_close_unmaps_and_keeps_fds() -> None:
    fd = memfd("close-unmaps", 0x1000)
    try:
        m = GuestMemory.from_regions([MemoryRegion(0, 0x1000, 0, 0, fd)])
        assert "close-unmaps" in mapped_memfd_names()
        m.close()
        m.close()  # idempotent
        assert "close-unmaps" not in mapped_memfd_names()
        os.fstat(fd)  # the caller's fd is untouched
        for op in (lambda: m.read_at(0, 1), lambda: m.read_u16(0), lambda: m.write_u64(0, 1)):
            with pytest.raises(GuestMemoryError) as info:
                op()
            assert info.value.kind is GuestMemoryErrorKind.CLOSED
        with pytest.raises(GuestMemoryError):
            m.translate_uva(0, 1)
        assert m.closed
    finally:
        os.close(fd)


def test_close_while_locked_defers_unmap() -> None:
    fd = memfd("close-locked", 0x2000)
    try:
        m = GuestMemory.from_regions([MemoryRegion(0x4000, 0x2000, 0, 0, fd)])
        rb = RequestBuffers(m, PagedRange(0x10, 0x20, [4]), is_write=True)
        with rb.lock(True) as locked:
            m.close()  # must neither raise nor unmap under the locked views
            assert "close-locked" in mapped_memfd_names()
            (view,) = locked.io_vecs()
            view[:5] = b"still"
            assert os.pread(fd, 5, 0x10) == b"still"
            del view
        assert "close-locked" not in mapped_memfd_names()
        with pytest.raises(GuestMemoryError) as info:
            m.read_at(0x4000, 1)
        assert info.value.kind is GuestMemoryErrorKind.CLOSED
    finally:
        os.close(fd)


def test_closed_memory_is_collectable() -> None:
    m = GuestMemory.allocate(PAGE_SIZE)
    ref = weakref.ref(m)
    m.close()
    del m
    assert ref() is None


def test_unaligned_mmap_offset(fd: int) -> None:
    os.pwrite(fd, b"0123456789", 0x1123)
    with GuestMemory.from_regions([MemoryRegion(0x8000, 0x2000, 0, 0x1123, fd)]) as m:
        assert m.read_at(0x8000, 10) == b"0123456789"
        m.write_at(0x9FFF, b"!")
        assert os.pread(fd, 1, 0x1123 + 0x1FFF) == b"!"
    with pytest.raises(GuestMemoryError) as info:
        GuestMemory.from_regions([MemoryRegion(0, 0x10000, 0, 0x1, fd)])
    assert info.value.kind is GuestMemoryErrorKind.FILE_TOO_SMALL


def test_view(lay: Layout) -> None:
    ro = lay.mem.view(0x20010, 8)
    assert ro.readonly and bytes(ro) == bytes(lay.model[0x20010:0x20018])
    rw = lay.mem.view(0x20010, 8, writable=True)
    rw[:2] = b"hi"
    assert lay.file_bytes(0x20010, 2) == b"hi" and bytes(ro[:2]) == b"hi"
    assert lay.mem.view(HOLE[0], 0).nbytes == 0
    with pytest.raises(GuestMemoryError):
        lay.mem.view(0x2FFFF, 2)
    with pytest.raises(ValueError):
        lay.mem.view(0, -1)


def hammer(m: GuestMemory, rb: IoBuffers, started: threading.Event) -> list[BaseException]:
    errors: list[BaseException] = []
    started.set()
    for _ in range(300):
        try:
            m.write_u32(8, m.read_u32(8) + 1)
            m.read_at(0, 64)
            with rb.lock(True) as locked:
                locked.io_vecs()[0][0] = 1
            rb.writer().zero(16)
        except (GuestMemoryError, AccessError):
            pass
        except BaseException as exc:  # anything else fails the test
            errors.append(exc)
            break
    return errors


def test_close_races_with_accesses_cleanly() -> None:
    """Accesses racing close() see the memory or a GuestMemoryError/AccessError, nothing else."""
    for _ in range(20):
        m = GuestMemory.allocate(4 * PAGE_SIZE)
        rb = request_buffers_from_buffers(m, [(100, 2 * PAGE_SIZE)], True)
        started = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            errors = pool.submit(hammer, m, rb, started)
            assert started.wait(10), "the hammer thread never started"
            m.close()
            assert errors.result() == []
