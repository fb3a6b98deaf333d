"""memory.shared: single aligned accesses to fields another agent reads concurrently."""

from __future__ import annotations

import mmap
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memory import GuestMemory, MemoryRegion
from memory.shared import full_fence, words
from vhost_user.errors import GuestFault
from vhost_user.ring.split import SplitVirtqueue


def test_words_are_little_endian_items_at_byte_offsets() -> None:
    buf = bytearray(16)
    view = memoryview(buf)
    w16, w32, w64 = words(view, "H"), words(view, "I"), words(view, "Q")
    w16[1] = 0xBEEF
    assert buf[2:4] == b"\xef\xbe"
    w32[2] = 0x01234567
    assert buf[8:12] == bytes.fromhex("67452301")
    assert w64[1] == 0x01234567
    assert w16[1] == 0xBEEF


@given(st.integers(-(1 << 70), 1 << 70))
def test_a_value_that_does_not_fit_leaves_memory_untouched(value: int) -> None:
    """struct.pack_into zeroes its target before it rejects a value; item stores do not."""
    buf = bytearray(b"\xaa" * 8)
    w16 = words(memoryview(buf), "H")
    if 0 <= value <= 0xFFFF:
        w16[2] = value
        assert int.from_bytes(buf[4:6], "little") == value
    else:
        with pytest.raises((ValueError, OverflowError, TypeError)):
            w16[2] = value
        assert buf == b"\xaa" * 8


def test_words_refuses_views_it_cannot_use() -> None:
    buf = bytearray(64)
    with pytest.raises(ValueError, match="whole number"):
        words(memoryview(buf)[:7], "H")
    with pytest.raises(ValueError, match="aligned"):
        words(memoryview(buf)[1:5], "H")  # a bytearray's storage is at least 8-aligned
    with pytest.raises(ValueError, match="aligned"):
        words(memoryview(buf)[4:12], "Q")
    with pytest.raises(ValueError, match="byte view"):
        words(memoryview(buf).cast("H"), "H")
    assert words(memoryview(bytes(8)), "I").readonly


def test_full_fence_returns() -> None:
    full_fence()
    full_fence()


@pytest.mark.parametrize("size", [2, 4, 8])
def test_guest_memory_fixed_width_accesses_at_unaligned_host_addresses(size: int) -> None:
    """An unaligned mmap offset still works (as a byte copy, with no single-store promise)."""
    fd = os.memfd_create("shared-test", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 0x4000)
        with GuestMemory.from_regions([MemoryRegion(0x10000, 0x2000, 0, 0x1001, fd)]) as m:
            assert not m.host_aligned(0x10000, 2)
            assert m.host_aligned(0x10001, 2)
            value = (1 << (8 * size)) - 3
            getattr(m, f"write_u{8 * size}")(0x10000, value)
            assert os.pread(fd, size, 0x1001) == value.to_bytes(size, "little")
            assert getattr(m, f"read_u{8 * size}")(0x10000) == value
            getattr(m, f"write_u{8 * size}")(0x10001, 5)  # host-aligned for 2 only
            assert getattr(m, f"read_u{8 * size}")(0x10001) == 5
    finally:
        os.close(fd)


def test_guest_memory_aligned_store_goes_through_one_item() -> None:
    with GuestMemory.allocate(mmap.PAGESIZE) as m:
        m.write_u64(8, 0x1122334455667788)
        m.write_u16(10, 0xAAAA)
        assert m.read_u64(8) == 0x11223344AAAA7788
        with pytest.raises(ValueError):
            m.write_u16(10, 1 << 16)
        assert m.read_u16(10) == 0xAAAA  # a rejected value wrote nothing


def test_ring_at_an_unaligned_host_address_is_refused() -> None:
    """A front-end's odd mmap offset makes an aligned guest ring unaligned in our mapping,
    where single aligned stores are impossible: the queue is refused, not served torn."""
    fd = os.memfd_create("ring-test", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 0x6000)
        with GuestMemory.from_regions([MemoryRegion(0, 0x4000, 0, 0x1002, fd)]) as m:
            with pytest.raises(GuestFault, match="host address"):
                SplitVirtqueue(m, 16, 0x0, 0x100, 0x200, event_idx=True)
        with GuestMemory.from_regions([MemoryRegion(0, 0x4000, 0, 0x1000, fd)]) as m:
            SplitVirtqueue(m, 16, 0x0, 0x100, 0x200, event_idx=True)
    finally:
        os.close(fd)
