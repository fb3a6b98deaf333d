"""Split virtqueue, device side: exact layouts, faults, index wrap, notification suppression.

Every test runs against each implementation in ``IMPLEMENTATIONS`` (the C twin joins the list).
The driver side is ``tests.support.driver_ring``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memory import GuestMemory, GuestMemoryError, MemoryRegion
from tests.support.driver_ring import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    DriverRing,
    ring_bytes,
)
from vhost_user.errors import GuestFault
from vhost_user.ring.chain import Descriptor, DescriptorChain
from vhost_user.ring.split import DESC, USED_ELEM, SplitVirtqueue, vring_need_event
from vhost_user.ring.virtqueue import Virtqueue

QueueFactory = Callable[..., Virtqueue]
IMPLEMENTATIONS: list[QueueFactory] = [SplitVirtqueue]

MEM_SIZE = 0x40000
RING = 0x1000
INDIRECT = 0x8000  # indirect tables (4 KiB)
BUF = 0x10000  # data buffers from here
SIZE = 8


@pytest.fixture(params=IMPLEMENTATIONS, ids=lambda f: f.__name__)
def make_queue(request: pytest.FixtureRequest) -> QueueFactory:
    factory: QueueFactory = request.param
    return factory


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with GuestMemory.allocate(MEM_SIZE) as m:
        yield m


def driver_for(mem: GuestMemory, size: int = SIZE) -> DriverRing:
    return DriverRing.at(mem, RING, size, indirect_area=(INDIRECT, 0x1000))


def queue_for(
    make_queue: QueueFactory, drv: DriverRing, *, event_idx: bool = False, **kw: int | None
) -> Virtqueue:
    return make_queue(
        drv.memory,
        drv.size,
        drv.desc_gpa,
        drv.avail_gpa,
        drv.used_gpa,
        event_idx=event_idx,
        **kw,
    )


def bufs(*spec: tuple[int, int, bool]) -> tuple[Descriptor, ...]:
    return tuple(Descriptor(*b) for b in spec)


# -- wire layouts -----------------------------------------------------------------------


def test_struct_layouts() -> None:
    assert DESC.size == 16
    assert USED_ELEM.size == 8
    raw = DESC.pack(0x1122334455667788, 0x99AABBCC, 0x0102, 0x0304)
    assert raw == bytes.fromhex("8877665544332211ccbbaa9902010403")
    assert DESC.unpack(raw) == (0x1122334455667788, 0x99AABBCC, 0x0102, 0x0304)
    assert USED_ELEM.pack(7, 0x200) == bytes.fromhex("0700000000020000")


def test_driver_layout_is_packed_and_aligned(mem: GuestMemory) -> None:
    drv = DriverRing.at(mem, 0x1008, 8)
    assert (drv.desc_gpa, drv.avail_gpa, drv.used_gpa) == (0x1010, 0x1090, 0x10A8)
    assert drv.used_gpa + 6 + 8 * 8 - drv.desc_gpa == ring_bytes(8)


# -- construction -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 3, 6, 100, 65536, -8])
def test_size_must_be_power_of_two(make_queue: QueueFactory, mem: GuestMemory, size: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        make_queue(mem, size, 0x1000, 0x2000, 0x3000, event_idx=False)


def test_largest_queue(make_queue: QueueFactory) -> None:
    n = 32768
    with GuestMemory.allocate(ring_bytes(n) + 0x1000) as m:
        drv = DriverRing.at(m, 0, n)
        q = queue_for(make_queue, drv)
        assert q.size == n
        head = drv.add_chain([(0x10, 1, False)])
        chain = q.pop()
        assert chain is not None and chain.head == head


@pytest.mark.parametrize(
    ("desc", "avail", "used"),
    [(0x1008, 0x2000, 0x3000), (0x1000, 0x2001, 0x3000), (0x1000, 0x2000, 0x3002)],
)
def test_misaligned_parts_are_rejected(
    make_queue: QueueFactory, mem: GuestMemory, desc: int, avail: int, used: int
) -> None:
    with pytest.raises(GuestFault, match="aligned"):
        make_queue(mem, 8, desc, avail, used, event_idx=False)


@pytest.mark.parametrize(
    ("desc", "avail", "used"),
    [
        (MEM_SIZE - 0x70, 0x2000, 0x3000),  # table (128 bytes) runs off the end
        (0x1000, MEM_SIZE - 20, 0x3000),  # avail needs 22 bytes incl. used_event
        (0x1000, 0x2000, MEM_SIZE - 0x44),  # used needs 70 bytes incl. avail_event
        (1 << 63, 0x2000, 0x3000),
    ],
)
def test_parts_outside_memory_are_rejected(
    make_queue: QueueFactory, mem: GuestMemory, desc: int, avail: int, used: int
) -> None:
    with pytest.raises(GuestMemoryError):
        make_queue(mem, 8, desc, avail, used, event_idx=True)


@pytest.mark.parametrize(("next_avail", "used"), [(65536, 0), (-1, 0), (0, 65536), (0, -1)])
def test_indices_must_be_u16(
    make_queue: QueueFactory, mem: GuestMemory, next_avail: int, used: int
) -> None:
    with pytest.raises(ValueError):
        queue_for(make_queue, driver_for(mem), next_avail_idx=next_avail, used_idx=used)


def test_used_idx_none_reads_memory_then_keeps_a_shadow(
    make_queue: QueueFactory, mem: GuestMemory
) -> None:
    drv = driver_for(mem)
    mem.write_u16(drv.used_gpa + 2, 41)
    q = queue_for(make_queue, drv, next_avail_idx=41)
    assert q.used_idx == 41
    mem.write_u16(drv.used_gpa + 2, 7)  # the queue never reads used->idx back
    drv.avail_idx = 41
    drv.add_chain([(BUF, 4, False)])
    chain = q.pop()
    assert chain is not None
    q.push_used(chain.head, 0)
    assert q.used_idx == 42 and drv.used_idx == 42


def test_explicit_used_idx_wins(make_queue: QueueFactory, mem: GuestMemory) -> None:
    drv = driver_for(mem)
    mem.write_u16(drv.used_gpa + 2, 41)
    q = queue_for(make_queue, drv, used_idx=3)
    assert q.used_idx == 3


# -- popping well-formed chains ---------------------------------------------------------


def test_empty_ring_pops_nothing(make_queue: QueueFactory, mem: GuestMemory) -> None:
    q = queue_for(make_queue, driver_for(mem))
    assert q.pop() is None
    assert q.next_avail_idx == 0 and q.in_flight == 0


def test_direct_chain_exact_layout(make_queue: QueueFactory, mem: GuestMemory) -> None:
    drv = driver_for(mem)
    q = queue_for(make_queue, drv)
    # Hand-written: head 5 -> 2 -> 7, readable, readable, writable.
    drv.write_desc(5, BUF, 16, VIRTQ_DESC_F_NEXT, 2)
    drv.write_desc(2, BUF + 0x1000, 4096, VIRTQ_DESC_F_NEXT, 7)
    drv.write_desc(7, BUF + 0x3000, 1, VIRTQ_DESC_F_WRITE, 6)  # `next` ignored without NEXT
    drv.push_head(5)
    assert mem.read_u16(drv.avail_gpa + 2) == 1 and mem.read_u16(drv.avail_gpa + 4) == 5
    assert q.pop() == DescriptorChain(
        5, bufs((BUF, 16, False), (BUF + 0x1000, 4096, False), (BUF + 0x3000, 1, True))
    )
    assert q.next_avail_idx == 1 and q.in_flight == 1
    assert q.pop() is None


def test_indirect_chain_exact_layout(make_queue: QueueFactory, mem: GuestMemory) -> None:
    drv = driver_for(mem)
    q = queue_for(make_queue, drv)
    table = INDIRECT + 0x100
    drv.write_desc_at(table + 0, BUF, 16, VIRTQ_DESC_F_NEXT, 2)
    drv.write_desc_at(table + 32, BUF + 0x100, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 1)
    drv.write_desc_at(table + 16, BUF + 0x400, 1, VIRTQ_DESC_F_WRITE, 0)
    # WRITE on the descriptor naming the table is ignored (§2.7.5.3.2).
    drv.write_desc(3, table, 48, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE, 0)
    drv.push_head(3)
    assert q.pop() == DescriptorChain(
        3, bufs((BUF, 16, False), (BUF + 0x100, 512, True), (BUF + 0x400, 1, True))
    )


def test_direct_descriptors_then_one_indirect(make_queue: QueueFactory, mem: GuestMemory) -> None:
    # §2.7.5.3.2: the device MUST handle normal descriptors followed by a single indirect one.
    drv = driver_for(mem)
    q = queue_for(make_queue, drv)
    drv.write_desc_at(INDIRECT, BUF + 0x200, 8, VIRTQ_DESC_F_NEXT, 1)
    drv.write_desc_at(INDIRECT + 16, BUF + 0x300, 9, VIRTQ_DESC_F_WRITE, 0)
    drv.write_desc(0, BUF, 1, VIRTQ_DESC_F_NEXT, 4)
    drv.write_desc(4, INDIRECT, 32, VIRTQ_DESC_F_INDIRECT, 0)
    drv.push_head(0)
    assert q.pop() == DescriptorChain(
        0, bufs((BUF, 1, False), (BUF + 0x200, 8, False), (BUF + 0x300, 9, True))
    )


def test_driver_helper_chains_come_back(make_queue: QueueFactory, mem: GuestMemory) -> None:
    drv = driver_for(mem)
    q = queue_for(make_queue, drv)
    specs = [
        [(BUF, 16, False), (BUF + 0x1000, 0x2000, True), (BUF + 0x4000, 1, True)],
        [(BUF + 0x8000, 4, True)],
        [(BUF, 16, False), (BUF + 0x100, 16, False), (BUF + 0x200, 1, True)],
    ]
    heads = [drv.add_chain(s, indirect=i == 1) for i, s in enumerate(specs)]
    for head, spec in zip(heads, specs, strict=True):
        assert q.pop() == DescriptorChain(head, bufs(*spec))
    assert q.in_flight == 3


def test_chain_as_long_as_the_queue_is_not_a_loop(
    make_queue: QueueFactory, mem: GuestMemory
) -> None:
    drv = driver_for(mem)
    q = queue_for(make_queue, drv)
    spec = [(BUF + 0x10 * i, 0x10, i >= 4) for i in range(SIZE)]
    head = drv.add_chain(spec)
    assert q.pop() == DescriptorChain(head, bufs(*spec))


def test_indirect_table_at_the_limit(make_queue: QueueFactory) -> None:
    with GuestMemory.allocate(0x40000) as m:
        drv = DriverRing.at(m, RING, 4, indirect_area=(0x20000, 0x10000))
        q = queue_for(make_queue, drv)
        assert isinstance(q, SplitVirtqueue)
        n = q.indirect_limit
        assert n == 1024
        spec = [(BUF + i, 1, True) for i in range(n)]
        head = drv.add_chain(spec, indirect=True)
        assert q.pop() == DescriptorChain(head, bufs(*spec))
        drv.write_desc(1, 0x20000, 16 * (n + 1), VIRTQ_DESC_F_INDIRECT, 0)
        drv.push_head(1)
        chain = q.pop()
        assert chain is not None and chain.fault is not None and not chain.complete


# -- used ring --------------------------------------------------------------------------


def test_push_used_exact_layout(make_queue: QueueFactory, mem: GuestMemory) -> None:
    drv = driver_for(mem)
    q = queue_for(make_queue, drv)
    head = drv.add_chain([(BUF, 1, True)])
    assert q.pop() is not None
    q.push_used(head, 0x1234)
    assert mem.read_at(drv.used_gpa, 4 + 8) == bytes.fromhex("000001000000000034120000")
    assert q.used_idx == 1 and q.in_flight == 0
    assert drv.used_entries() == [(head, 0x1234)]


@pytest.mark.parametrize(("head", "length"), [(-1, 0), (0, 1 << 32), (1 << 32, 0)])
def test_push_used_rejects_values_that_do_not_fit(
    make_queue: QueueFactory, mem: GuestMemory, head: int, length: int
) -> None:
    q = queue_for(make_queue, driver_for(mem))
    with pytest.raises(ValueError):
        q.push_used(head, length)
    assert q.used_idx == 0


def test_indices_wrap_past_65535(make_queue: QueueFactory, mem: GuestMemory) -> None:
    drv = driver_for(mem)
    start = 65533
    drv.avail_idx = start
    drv.set_avail_idx(start)
    mem.write_u16(drv.used_gpa + 2, start)
    drv.last_used = start
    q = queue_for(make_queue, drv, next_avail_idx=start)
    assert q.used_idx == start
    seen = []
    for round_ in range(3):
        specs = [[(BUF + 0x100 * i, 0x10 + i, bool(i % 2))] for i in range(5)]
        heads = [drv.add_chain(s, publish=False) for s in specs]
        drv.publish()
        for head, spec in zip(heads, specs, strict=True):
            chain = q.pop()
            assert chain == DescriptorChain(head, bufs(*spec))
            q.push_used(head, round_)
        assert q.pop() is None
        seen += drv.used_entries()
        assert drv.num_free == SIZE
    assert q.next_avail_idx == q.used_idx == (start + 15) & 0xFFFF == 12
    assert len(seen) == 15
    # Slot positions follow idx % size across the wrap: the 4th entry (idx 65536 = 0) is slot 0.
    assert mem.read_u16(drv.avail_gpa + 2) == 12


def test_avail_index_a_full_ring_ahead_is_fine(make_queue: QueueFactory, mem: GuestMemory) -> None:
    drv = driver_for(mem)
    drv.avail_idx = 65530
    q = queue_for(make_queue, drv, next_avail_idx=65530)
    for _ in range(SIZE):
        drv.add_chain([(BUF, 1, False)])
    for _ in range(SIZE):
        assert q.pop() is not None
    assert q.pop() is None and q.in_flight == SIZE


@pytest.mark.parametrize(("next_avail", "avail_idx"), [(0, SIZE + 1), (0, 0xFFFF), (65534, 7)])
def test_avail_index_too_far_ahead_is_a_queue_fault(
    make_queue: QueueFactory, mem: GuestMemory, next_avail: int, avail_idx: int
) -> None:
    drv = driver_for(mem)
    q = queue_for(make_queue, drv, next_avail_idx=next_avail)
    drv.set_avail_idx(avail_idx)
    with pytest.raises(GuestFault, match="queue size"):
        q.pop()
    assert q.next_avail_idx == next_avail


# -- chain faults -----------------------------------------------------------------------


def pop_one(q: Virtqueue) -> DescriptorChain:
    chain = q.pop()
    assert chain is not None
    return chain


def broken(q: Virtqueue, match: str) -> DescriptorChain:
    chain = pop_one(q)
    assert chain.fault is not None and not chain.complete, chain
    assert match in str(chain.fault)
    return chain


def bad_buffer(q: Virtqueue, match: str) -> DescriptorChain:
    chain = pop_one(q)
    assert chain.fault is not None and chain.complete, chain
    assert match in str(chain.fault)
    return chain


def test_head_past_queue_size(make_queue: QueueFactory, mem: GuestMemory) -> None:
    drv = driver_for(mem)
    q = queue_for(make_queue, drv)
    drv.push_head(SIZE)
    chain = broken(q, "head index")
    assert chain.head == SIZE and chain.descriptors == ()
    # The queue goes on: the next chain is fine.
    head = drv.add_chain([(BUF, 1, False)])
    assert pop_one(q) == DescriptorChain(head, bufs((BUF, 1, False)))


def test_next_past_queue_size(make_queue: QueueFactory, mem: GuestMemory) -> None:
    drv = driver_for(mem)
    q = queue_for(make_queue, drv)
    drv.write_desc(0, BUF, 4, VIRTQ_DESC_F_NEXT, SIZE)
    drv.push_head(0)
    assert broken(q, "next index").descriptors == bufs((BUF, 4, False))


@pytest.mark.parametrize("cycle", [[3], [3, 4], [0, 1, 2, 3, 4, 5, 6, 7]])
def test_direct_loops(make_queue: QueueFactory, mem: GuestMemory, cycle: list[int]) -> None:
    drv = driver_for(mem)
    q = queue_for(make_queue, drv)
    for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True):
        drv.write_desc(a, BUF, 1, VIRTQ_DESC_F_NEXT, b)
    drv.push_head(cycle[0])
    assert len(broken(q, "loops").descriptors) == SIZE


def test_loop_reached_from_a_tail(make_queue: QueueFactory, mem: GuestMemory) -> None:
    drv = driver_for(mem)
    q = queue_for(make_queue, drv)
    drv.write_desc(0, BUF, 1, VIRTQ_DESC_F_NEXT, 1)
    drv.write_desc(1, BUF, 1, VIRTQ_DESC_F_NEXT, 2)
    drv.write_desc(2, BUF, 1, VIRTQ_DESC_F_NEXT, 1)
    drv.push_head(0)
    broken(q, "loops")


def test_indirect_with_next(make_queue: QueueFactory, mem: GuestMemory) -> None:
    drv = driver_for(mem)
    q = queue_for(make_queue, drv)
    drv.write_desc_at(INDIRECT, BUF, 1, 0, 0)
    drv.write_desc(0, INDIRECT, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)
    drv.write_desc(1, BUF, 1, 0, 0)
    drv.push_head(0)
    broken(q, "INDIRECT with NEXT")


def test_nested_indirect(make_queue: QueueFactory, mem: GuestMemory) -> None:
    drv = driver_for(mem)
    q = queue_for(make_queue, drv)
    drv.write_desc_at(INDIRECT, BUF, 1, VIRTQ_DESC_F_NEXT, 1)
    drv.write_desc_at(INDIRECT + 16, INDIRECT, 32, VIRTQ_DESC_F_INDIRECT, 0)
    drv.write_desc(0, INDIRECT, 32, VIRTQ_DESC_F_INDIRECT, 0)
    drv.push_head(0)
    assert broken(q, "nested indirect").descriptors == bufs((BUF, 1, False))


@pytest.mark.parametrize(
    ("addr", "length", "match"),
    [
        (INDIRECT, 0, "indirect table length"),
        (INDIRECT, 24, "indirect table length"),
        (INDIRECT, 16 * 1025, "indirect table length"),
        (MEM_SIZE - 16, 32, "not in memory"),
        ((1 << 64) - 16, 32, "not in memory"),
        (1 << 40, 16, "not in memory"),
    ],
)
def test_malformed_indirect_tables(
    make_queue: QueueFactory, mem: GuestMemory, addr: int, length: int, match: str
) -> None:
    drv = driver_for(mem)
    q = queue_for(make_queue, drv)
    drv.write_desc(0, addr, length, VIRTQ_DESC_F_INDIRECT, 0)
    drv.push_head(0)
    broken(q, match)


def test_indirect_next_past_table(make_queue: QueueFactory, mem: GuestMemory) -> None:
    drv = driver_for(mem)
    q = queue_for(make_queue, drv)
    drv.write_desc_at(INDIRECT, BUF, 1, VIRTQ_DESC_F_NEXT, 1)
    drv.write_desc_at(INDIRECT + 16, BUF, 1, VIRTQ_DESC_F_NEXT, 2)  # the table has 2 entries
    drv.write_desc_at(INDIRECT + 32, BUF, 1, 0, 0)
    drv.write_desc(0, INDIRECT, 32, VIRTQ_DESC_F_INDIRECT, 0)
    drv.push_head(0)
    assert len(broken(q, "next index 2").descriptors) == 2


def test_indirect_loop(make_queue: QueueFactory, mem: GuestMemory) -> None:
    drv = driver_for(mem)
    q = queue_for(make_queue, drv)
    drv.write_desc_at(INDIRECT, BUF, 1, VIRTQ_DESC_F_NEXT, 1)
    drv.write_desc_at(INDIRECT + 16, BUF, 1, VIRTQ_DESC_F_NEXT, 0)
    drv.write_desc(0, INDIRECT, 32, VIRTQ_DESC_F_INDIRECT, 0)
    drv.push_head(0)
    assert len(broken(q, "loops").descriptors) == 2


@pytest.mark.parametrize(
    ("addr", "length"),
    [
        (MEM_SIZE, 1),
        (MEM_SIZE - 1, 2),
        (1 << 50, 0x1000),
        ((1 << 64) - 1, 2),  # addr + len overflows u64
        ((1 << 64) - 0x1000, 0xFFFF0000),
    ],
)
def test_buffer_outside_memory_is_a_complete_fault(
    make_queue: QueueFactory, mem: GuestMemory, addr: int, length: int
) -> None:
    drv = driver_for(mem)
    q = queue_for(make_queue, drv)
    head = drv.add_chain([(BUF, 16, False), (addr, length, False), (BUF + 0x100, 1, True)])
    chain = bad_buffer(q, "not guest memory")
    assert chain.head == head
    # Complete: the device may still write a status into the (valid) last buffer.
    assert chain.descriptors == bufs(
        (BUF, 16, False), (addr, length, False), (BUF + 0x100, 1, True)
    )


def test_zero_length_buffer(make_queue: QueueFactory, mem: GuestMemory) -> None:
    drv = driver_for(mem)
    q = queue_for(make_queue, drv)
    drv.add_chain([(BUF, 16, False), (BUF, 0, True), (BUF + 0x100, 1, True)])
    assert len(bad_buffer(q, "zero-length").descriptors) == 3


def test_readable_after_writable(make_queue: QueueFactory, mem: GuestMemory) -> None:
    drv = driver_for(mem)
    q = queue_for(make_queue, drv)
    drv.add_chain([(BUF, 16, True), (BUF + 0x100, 16, False)], indirect=True)
    chain = bad_buffer(q, "readable after writable")
    assert chain.descriptors == bufs((BUF, 16, True), (BUF + 0x100, 16, False))


def test_first_buffer_fault_is_kept_and_structure_wins(
    make_queue: QueueFactory, mem: GuestMemory
) -> None:
    drv = driver_for(mem)
    q = queue_for(make_queue, drv)
    drv.write_desc(0, BUF, 0, VIRTQ_DESC_F_NEXT, 1)
    drv.write_desc(1, 1 << 50, 1, VIRTQ_DESC_F_NEXT, 2)
    drv.write_desc(2, BUF, 1, 0, 0)
    drv.push_head(0)
    assert "zero-length" in str(bad_buffer(q, "descriptor 0").fault)
    drv.write_desc(2, BUF, 1, VIRTQ_DESC_F_NEXT, 0)  # now it also loops
    drv.push_head(0)
    chain = broken(q, "loops")
    assert "zero-length" in str(chain.fault)


def test_chain_longer_than_4gib() -> None:
    # Sparse: the anonymous mapping is only touched where the rings are.
    with GuestMemory.allocate((1 << 32) + 0x20000) as m:
        drv = DriverRing.at(m, RING, 4)
        for factory in IMPLEMENTATIONS:
            q = queue_for(factory, drv, next_avail_idx=drv.avail_idx)
            drv.add_chain([(0x10000, 0xFFFFFFFF, False), (0x10000, 1, True)])
            bad_buffer(q, "4 GiB")
            drv.add_chain([(0x10000, 0xFFFFFFFE, False), (0x10000, 1, True)])
            assert pop_one(q).fault is None


# -- memory made of several regions -----------------------------------------------------


@pytest.fixture
def regions_mem() -> Iterator[GuestMemory]:
    """0x0-0x10000 and 0x10000-0x20000 adjacent (separate files), a hole, 0x30000-0x40000."""
    fds = []
    regions = []
    for gpa, uva in ((0x0, 0x7F0000000000), (0x10000, 0x7F0000100000), (0x30000, 0x7F0000200000)):
        fd = os.memfd_create(f"vq-test-{gpa:x}", os.MFD_CLOEXEC)
        os.ftruncate(fd, 0x10000)
        fds.append(fd)
        regions.append(MemoryRegion(gpa, 0x10000, uva, 0, fd))
    try:
        with GuestMemory.from_regions(regions) as m:
            yield m
    finally:
        for fd in fds:
            os.close(fd)


def test_buffers_may_span_adjacent_regions_not_holes(
    make_queue: QueueFactory, regions_mem: GuestMemory
) -> None:
    drv = DriverRing.at(regions_mem, RING, SIZE)
    q = queue_for(make_queue, drv)
    head = drv.add_chain([(0xF000, 0x2000, True)])
    assert pop_one(q) == DescriptorChain(head, bufs((0xF000, 0x2000, True)))
    drv.add_chain([(0x1F000, 0x2000, True)])
    bad_buffer(q, "not guest memory")
    drv.add_chain([(0x30000, 0x10000, True)])
    assert pop_one(q).fault is None


def test_indirect_table_spanning_adjacent_regions(
    make_queue: QueueFactory, regions_mem: GuestMemory
) -> None:
    drv = DriverRing.at(regions_mem, RING, SIZE)
    q = queue_for(make_queue, drv)
    table = 0x10000 - 40  # 5 entries, the third straddles the boundary
    spec = [(0x30000 + 0x100 * i, 0x10, i >= 3) for i in range(5)]
    raw = b"".join(
        DESC.pack(
            gpa,
            length,
            (VIRTQ_DESC_F_WRITE if writable else 0) | (VIRTQ_DESC_F_NEXT if i < 4 else 0),
            i + 1,
        )
        for i, (gpa, length, writable) in enumerate(spec)
    )
    regions_mem.write_at(table, raw[:40])  # flat writes stay inside one region
    regions_mem.write_at(0x10000, raw[40:])
    drv.write_desc(0, table, 80, VIRTQ_DESC_F_INDIRECT, 0)
    drv.push_head(0)
    assert pop_one(q) == DescriptorChain(0, bufs(*spec))
    drv.write_desc(1, 0x20000 - 16, 32, VIRTQ_DESC_F_INDIRECT, 0)  # runs into the hole
    drv.push_head(1)
    broken(q, "not in memory")


def test_ring_must_be_in_one_region(make_queue: QueueFactory, regions_mem: GuestMemory) -> None:
    with pytest.raises(GuestMemoryError):
        make_queue(regions_mem, 8, 0x10000 - 64, 0x2000, 0x3000, event_idx=False)


# -- notifications without EVENT_IDX ----------------------------------------------------


def test_disable_enable_use_used_flags(make_queue: QueueFactory, mem: GuestMemory) -> None:
    drv = driver_for(mem)
    q = queue_for(make_queue, drv)
    q.disable_notifications()
    assert drv.used_flags == VIRTQ_USED_F_NO_NOTIFY
    assert q.enable_notifications() is False
    assert drv.used_flags == 0
    assert drv.avail_event == 0


def test_enable_reports_buffers_added_while_disabled(
    make_queue: QueueFactory, mem: GuestMemory
) -> None:
    # The lost-kick race: the driver adds a buffer after our last pop but while it still sees
    # NO_NOTIFY, so it does not kick. enable_notifications must say "look again".
    for event_idx in (False, True):
        drv = driver_for(mem)
        q = queue_for(make_queue, drv, event_idx=event_idx)
        q.disable_notifications()
        assert q.pop() is None
        head = drv.add_chain([(BUF, 1, False)])
        assert q.enable_notifications() is True
        assert pop_one(q).head == head
        assert q.enable_notifications() is False


def test_should_notify_honours_no_interrupt(make_queue: QueueFactory, mem: GuestMemory) -> None:
    drv = driver_for(mem)
    q = queue_for(make_queue, drv)
    # First decision after start: always yes (what the driver was last told is unknown).
    assert q.should_notify() is True
    assert q.should_notify() is False  # nothing new since
    for flags, expect in ((0, True), (VIRTQ_AVAIL_F_NO_INTERRUPT, False), (0, True)):
        drv.set_avail_flags(flags)
        head = drv.add_chain([(BUF, 1, False)])
        assert pop_one(q).head == head
        q.push_used(head, 0)
        assert q.should_notify() is expect
        drv.used_entries()


# -- EVENT_IDX ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "new", "old", "expect"),
    [
        (0, 1, 0, True),
        (0, 0, 0, False),
        (5, 5, 3, False),  # not yet: 3 and 4 written
        (4, 5, 3, True),
        (3, 5, 3, True),
        (2, 5, 3, False),  # already notified for it
        (0xFFFF, 2, 0xFFFE, True),  # wrap: 65534, 65535, 0, 1 written
        (1, 2, 0xFFFE, True),
        (2, 2, 0xFFFE, False),
        (0xFFFD, 2, 0xFFFE, False),
    ],
)
def test_vring_need_event(event: int, new: int, old: int, expect: bool) -> None:
    assert vring_need_event(event, new, old) is expect


@given(event=st.integers(0, 0xFFFF), old=st.integers(0, 0xFFFF), step=st.integers(0, 0xFFFF))
def test_vring_need_event_means_event_was_written(event: int, old: int, step: int) -> None:
    new = (old + step) & 0xFFFF
    written = {(old + i) & 0xFFFF for i in range(step)}
    assert vring_need_event(event, new, old) is (event in written)


def test_enable_writes_avail_event_and_disable_leaves_it(
    make_queue: QueueFactory, mem: GuestMemory
) -> None:
    drv = driver_for(mem)
    drv.avail_idx = 0xFFFE
    drv.publish()
    q = queue_for(make_queue, drv, event_idx=True, next_avail_idx=0xFFFE)
    assert q.enable_notifications() is False
    assert drv.avail_event == 0xFFFE
    for _ in range(3):
        drv.add_chain([(BUF, 1, False)])
        pop_one(q)
    q.disable_notifications()
    assert drv.used_flags == 0  # §2.7.10.2: flags stay 0 with EVENT_IDX
    assert drv.avail_event == 0xFFFE
    assert q.enable_notifications() is False
    assert drv.avail_event == 1


@pytest.mark.parametrize(
    ("start", "used_event", "batches"),
    [
        # used_event = index of the entry whose write must raise an interrupt.
        (0, 0, [(1, True), (1, False), (3, False)]),
        (0, 2, [(1, False), (1, False), (1, True), (2, False)]),
        (0, 3, [(2, False), (2, True)]),
        (0xFFFD, 0xFFFF, [(1, False), (2, True), (1, False)]),
        (0xFFFD, 0, [(2, False), (2, True)]),
        (0xFFFD, 1, [(4, False), (1, True)]),
    ],
)
def test_event_idx_notify_decisions(
    make_queue: QueueFactory,
    mem: GuestMemory,
    start: int,
    used_event: int,
    batches: list[tuple[int, bool]],
) -> None:
    drv = driver_for(mem)
    drv.avail_idx = start
    drv.last_used = start
    mem.write_u16(drv.used_gpa + 2, start)
    q = queue_for(make_queue, drv, event_idx=True, next_avail_idx=start)
    assert q.should_notify() is True  # first decision after a (re)start
    drv.set_used_event(used_event)
    # NO_INTERRUPT must be ignored with EVENT_IDX (§2.7.7.2).
    drv.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    for count, expect in batches:
        for _ in range(count):
            head = drv.add_chain([(BUF, 1, True)])
            assert pop_one(q).head == head
            q.push_used(head, 1)
        drv.used_entries()
        assert q.should_notify() is expect, (count, q.used_idx)


# -- concurrency --------------------------------------------------------------------------


def _device_loop(
    q: Virtqueue,
    kick: threading.Event,
    call: threading.Event,
    done: threading.Event,
    served: list[int],
) -> None:
    """A queue worker in miniature: sleeps until kicked (no polling that could hide a lost
    kick), then drains with the disable / pop / enable-and-recheck dance."""
    while True:
        # Bounded only so that a failed test cannot leave this thread behind forever: the
        # driver's own wait (seconds) fails the test long before a minute without kicks.
        if not kick.wait(60):
            return
        kick.clear()
        if done.is_set():
            return
        while True:
            q.disable_notifications()
            while (chain := q.pop()) is not None:
                served.append(chain.descriptors[0].length)
                q.push_used(chain.head, 0)
            if q.should_notify():
                call.set()
            if not q.enable_notifications():
                break


@pytest.mark.parametrize("event_idx", [False, True])
def test_concurrent_driver_loses_no_kick_or_interrupt(
    make_queue: QueueFactory, mem: GuestMemory, event_idx: bool
) -> None:
    """Driver and device on two threads, kicks and interrupts as events, both sides honouring
    suppression. A lost kick or interrupt leaves both asleep: the driver's wait times out."""
    total = 2000
    drv = driver_for(mem)
    q = queue_for(make_queue, drv, event_idx=event_idx)
    kick, call, done = threading.Event(), threading.Event(), threading.Event()
    served: list[int] = []
    worker = threading.Thread(target=_device_loop, args=(q, kick, call, done, served), daemon=True)
    worker.start()
    try:
        sent = completed = 0
        while True:
            call.clear()
            while sent < total and drv.num_free:
                old = drv.published_idx
                drv.add_chain([(BUF, sent + 1, False)])
                sent += 1
                # The driver's half of §2.7.10: kick only if the device asked for it.
                if event_idx:
                    if vring_need_event(drv.avail_event, drv.published_idx, old):
                        kick.set()
                elif not drv.used_flags & VIRTQ_USED_F_NO_NOTIFY:
                    kick.set()
            completed += len(drv.used_entries())
            if completed == total:
                break
            if sent < total and drv.num_free:
                continue
            # The driver's half of §2.7.7: ask for an interrupt on the next entry, re-check.
            drv.set_used_event(drv.last_used)
            if drv.used_idx != drv.last_used:
                continue
            assert call.wait(5.0), f"stalled: {completed} done, {sent} sent ({q!r})"
        assert served == list(range(1, total + 1))
    finally:
        done.set()
        kick.set()
        worker.join(5)
    assert not worker.is_alive()
