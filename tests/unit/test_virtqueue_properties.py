"""Split virtqueue against anything a guest can write: property tests.

Whatever bytes sit in the descriptor table, the available ring and indirect tables, ``pop()``
returns a chain or raises ``GuestFault``, visits a bounded number of descriptors, never hands out
a buffer outside guest memory on a chain without a fault, and agrees with a deliberately naive
reference walker (a set of visited indices instead of a counter, recursion-free but written
from the spec's rules, not from the implementation). Chains a well-behaved driver adds come back
exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from memory import GuestMemory
from tests.support.driver_ring import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DriverRing,
)
from tests.unit.test_virtqueue import IMPLEMENTATIONS, QueueFactory
from vhost_user.errors import GuestFault
from vhost_user.ring.chain import Descriptor, DescriptorChain
from vhost_user.ring.split import DESC, SplitVirtqueue

MEM_SIZE = 0x10000  # small, so random addresses often land near the edge
RING = 0x0
TABLES = 0x4000  # indirect tables live in [TABLES, TABLES + 0x1000)
SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def mem() -> Iterator[GuestMemory]:
    with GuestMemory.allocate(MEM_SIZE) as m:
        yield m


@pytest.fixture(params=IMPLEMENTATIONS, ids=lambda f: f.__name__)
def make_queue(request: pytest.FixtureRequest) -> QueueFactory:
    factory: QueueFactory = request.param
    return factory


# -- the reference walker -----------------------------------------------------------------


@dataclass
class Expected:
    descriptors: list[Descriptor]
    structural: bool  # broken structure: complete=False
    buffer_fault: bool  # a bad buffer in a fully walked chain


def reference_walk(mem: GuestMemory, size: int, desc_gpa: int, head: int) -> Expected:
    """The spec's rules, written the plain way (visited sets, re-reading memory)."""

    def read(table: int, i: int) -> tuple[int, int, int, int]:
        return DESC.unpack(mem.read_at(table + 16 * i, 16))

    out: list[Descriptor] = []
    if head >= size:
        return Expected(out, True, False)
    table, entries, i, visited = desc_gpa, size, head, set[int]()
    in_indirect = False
    while True:
        visited.add(i)
        addr, length, flags, nxt = read(table, i)
        if flags & VIRTQ_DESC_F_INDIRECT:
            if in_indirect or flags & VIRTQ_DESC_F_NEXT:
                return Expected(out, True, False)
            if length == 0 or length % 16 or length // 16 > max(size, 1024):
                return Expected(out, True, False)
            if addr + length > MEM_SIZE:
                return Expected(out, True, False)
            table, entries, i, visited, in_indirect = addr, length // 16, 0, set(), True
            continue
        out.append(Descriptor(addr, length, bool(flags & VIRTQ_DESC_F_WRITE)))
        if not flags & VIRTQ_DESC_F_NEXT:
            break
        if nxt >= entries or nxt in visited:
            return Expected(out, True, False)
        i = nxt
    bad = False
    writable_seen = False
    for d in out:
        if d.length == 0 or d.gpa + d.length > MEM_SIZE:
            bad = True
        if d.device_writable:
            writable_seen = True
        elif writable_seen:
            bad = True
    return Expected(out, False, bad or sum(d.length for d in out) > 0xFFFFFFFF)


def check_chain(mem: GuestMemory, q: SplitVirtqueue, desc_gpa: int, head: int) -> None:
    chain = q.pop()
    assert chain is not None and chain.head == head
    # Bounded: the direct part is at most a queue long, plus at most one indirect table.
    assert len(chain.descriptors) <= q.size + q.indirect_limit
    assert chain.complete or chain.fault is not None
    if chain.fault is None:
        for d in chain.descriptors:
            assert d.length > 0
            assert mem.read_at(d.gpa, d.length) is not None  # inside guest memory
    expected = reference_walk(mem, q.size, desc_gpa, head)
    event(
        "structural fault"
        if not chain.complete
        else f"{'buffer fault' if chain.fault else 'ok'}, {min(len(chain.descriptors), 3)} bufs"
    )
    if expected.structural:
        assert chain.fault is not None and not chain.complete
    else:
        assert chain.complete
        assert list(chain.descriptors) == expected.descriptors
        assert (chain.fault is not None) is expected.buffer_fault


# -- strategies ---------------------------------------------------------------------------


def descriptor(size: int) -> st.SearchStrategy[bytes]:
    """A descriptor biased towards the interesting: mostly plausible ones (in-memory buffers,
    sane flags, next inside the table, indirect tables in the table area) so that chains get
    long, mixed with edges, overflow, every flag combination and wild indices."""
    addr = st.one_of(
        st.integers(0x8000, MEM_SIZE - 1),
        st.sampled_from([TABLES, TABLES + 0x10, TABLES + 0x800, MEM_SIZE - 16, MEM_SIZE]),
        st.integers(0, (1 << 64) - 1),
    )
    length = st.one_of(
        st.integers(1, 0x100),
        st.sampled_from([0, 16, 32, 48, 64, 24, 0x1000, 0xFFFFFFFF]),
        st.integers(0, 0xFFFFFFFF),
    )
    flags = st.one_of(
        st.sampled_from([VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE]),
        st.integers(0, 7),
        st.integers(0, 0xFFFF),
    )
    nxt = st.one_of(st.integers(0, size - 1), st.integers(0, size + 1), st.integers(0, 0xFFFF))
    plausible = st.builds(
        DESC.pack,
        st.integers(0x8000, MEM_SIZE - 0x100),
        st.integers(1, 0x100),
        st.sampled_from([VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 0, 2]),
        st.integers(0, size - 1),
    )
    indirect = st.builds(
        DESC.pack,
        st.sampled_from([TABLES, TABLES + 0x40, TABLES + 0x100]),
        st.sampled_from([16, 32, 64, 128, 0x400]),
        st.just(VIRTQ_DESC_F_INDIRECT),
        st.just(0),
    )
    return st.one_of(plausible, indirect, st.builds(DESC.pack, addr, length, flags, nxt))


@st.composite
def hostile_ring(draw: st.DrawFn) -> tuple[int, bytes, bytes, list[int], int]:
    size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    table = b"".join(draw(st.lists(descriptor(size), min_size=size, max_size=size)))
    indirect = b"".join(draw(st.lists(descriptor(32), min_size=0, max_size=32)))
    heads = draw(st.lists(st.integers(0, size + 2), min_size=1, max_size=size))
    start = draw(st.sampled_from([0, 1, 0xFFFF - len(heads) // 2, 0x7FFF]))
    return size, table, indirect, heads, start


# -- properties ---------------------------------------------------------------------------


@SETTINGS
@given(ring=hostile_ring(), event_idx=st.booleans())
def test_pop_survives_any_structured_ring(
    make_queue: QueueFactory,
    mem: GuestMemory,
    ring: tuple[int, bytes, bytes, list[int], int],
    event_idx: bool,
) -> None:
    size, table, indirect, heads, start = ring
    mem.write_at(TABLES, bytes(0x1000))
    if indirect:
        mem.write_at(TABLES, indirect[:0x1000])
    drv = DriverRing.at(mem, RING, size)
    drv.write_desc_table(table)
    drv.avail_idx = start
    for head in heads:
        drv.push_head(head, publish=False)
    drv.publish()
    q = make_queue(
        mem,
        size,
        drv.desc_gpa,
        drv.avail_gpa,
        drv.used_gpa,
        event_idx=event_idx,
        next_avail_idx=start,
    )
    assert isinstance(q, SplitVirtqueue)
    for head in heads:
        check_chain(mem, q, drv.desc_gpa, head)
        q.push_used(head, 0)
    assert q.pop() is None
    assert drv.used_entries() == [(h, 0) for h in heads]


@SETTINGS
@given(
    size=st.sampled_from([1, 2, 4, 8, 16, 32]),
    table=st.binary(min_size=16 * 32, max_size=16 * 32),
    avail=st.binary(min_size=4 + 2 * 32, max_size=4 + 2 * 32),
    tables=st.binary(min_size=0x100, max_size=0x100),
    next_avail=st.integers(0, 0xFFFF),
    ahead=st.one_of(st.integers(0, 32), st.none()),
)
def test_pop_survives_any_bytes(
    make_queue: QueueFactory,
    mem: GuestMemory,
    size: int,
    table: bytes,
    avail: bytes,
    tables: bytes,
    next_avail: int,
    ahead: int | None,
) -> None:
    drv = DriverRing.at(mem, RING, size, reset=False)
    mem.write_at(TABLES, tables)
    drv.write_desc_table(table[: 16 * size])
    mem.write_at(drv.avail_gpa, avail[: 6 + 2 * size])
    if ahead is not None:  # else avail->idx is whatever the random bytes say
        drv.set_avail_idx(next_avail + ahead)
    q = make_queue(
        mem,
        size,
        drv.desc_gpa,
        drv.avail_gpa,
        drv.used_gpa,
        event_idx=True,
        next_avail_idx=next_avail,
    )
    assert isinstance(q, SplitVirtqueue)
    pending = (mem.read_u16(drv.avail_gpa + 2) - next_avail) & 0xFFFF
    if pending > size:
        with pytest.raises(GuestFault):
            q.pop()
        return
    for n in range(pending):
        head = mem.read_u16(drv.avail_gpa + 4 + 2 * ((next_avail + n) % size))
        check_chain(mem, q, drv.desc_gpa, head)
    assert q.pop() is None
    assert q.in_flight == pending


def buffer() -> st.SearchStrategy[tuple[int, int]]:
    return st.integers(0x8000, MEM_SIZE - 1).flatmap(
        lambda gpa: st.tuples(st.just(gpa), st.integers(1, MEM_SIZE - gpa))
    )


@st.composite
def well_formed_chain(draw: st.DrawFn, size: int) -> tuple[list[tuple[int, int, bool]], bool]:
    indirect = draw(st.booleans())
    n = draw(st.integers(1, 20 if indirect else size))
    readable = draw(st.integers(0, n))
    bufs = draw(st.lists(buffer(), min_size=n, max_size=n))
    return [(gpa, ln, i >= readable) for i, (gpa, ln) in enumerate(bufs)], indirect


@settings(SETTINGS, max_examples=60)
@given(data=st.data(), size=st.sampled_from([4, 8, 16]), start=st.integers(0, 0xFFFF))
def test_round_trip(
    make_queue: QueueFactory, mem: GuestMemory, data: st.DataObject, size: int, start: int
) -> None:
    drv = DriverRing.at(mem, RING, size, indirect_area=(TABLES, 0x4000))
    drv.avail_idx = start
    drv.publish()
    mem.write_u16(drv.used_gpa + 2, start)
    drv.last_used = start
    q = make_queue(
        mem,
        size,
        drv.desc_gpa,
        drv.avail_gpa,
        drv.used_gpa,
        event_idx=False,
        next_avail_idx=start,
        used_idx=None,
    )
    for _ in range(data.draw(st.integers(1, 3))):
        added = []
        while True:
            spec, indirect = data.draw(well_formed_chain(size))
            if (1 if indirect else len(spec)) > drv.num_free:
                break
            added.append((drv.add_chain(spec, indirect=indirect, publish=False), spec))
        drv.publish()
        for i, (head, spec) in enumerate(added):
            chain = q.pop()
            assert chain == DescriptorChain(head, tuple(Descriptor(*b) for b in spec))
            q.push_used(head, i)
        assert q.pop() is None
        assert drv.used_entries() == [(head, i) for i, (head, _) in enumerate(added)]
    assert q.used_idx == q.next_avail_idx == drv.avail_idx


@settings(SETTINGS, max_examples=150)
@given(
    data=st.data(),
    size=st.sampled_from([2, 8, 16]),
    mutations=st.lists(
        st.tuples(st.booleans(), st.integers(0, 0xFFF), st.binary(min_size=1, max_size=8)),
        max_size=4,
    ),
)
def test_pop_survives_mutated_well_formed_rings(
    make_queue: QueueFactory,
    mem: GuestMemory,
    data: st.DataObject,
    size: int,
    mutations: list[tuple[bool, int, bytes]],
) -> None:
    """Long, nearly valid chains (direct and indirect) with a few bytes flipped: the faults
    hypothesis finds this way sit deep inside chains, where random tables rarely reach."""
    drv = DriverRing.at(mem, RING, size, indirect_area=(TABLES, 0x4000))
    added = []
    while True:
        spec, indirect = data.draw(well_formed_chain(size))
        if (1 if indirect else len(spec)) > drv.num_free:
            break
        added.append(drv.add_chain(spec, indirect=indirect, publish=False))
    for in_table, offset, patch in mutations:
        if in_table:
            at = drv.desc_gpa + offset % (16 * size)
            patch = patch[: drv.desc_gpa + 16 * size - at]
        else:
            at = TABLES + offset
        mem.write_at(at, patch)
    drv.publish()
    q = make_queue(
        mem, size, drv.desc_gpa, drv.avail_gpa, drv.used_gpa, event_idx=False, used_idx=0
    )
    assert isinstance(q, SplitVirtqueue)
    for head in added:
        check_chain(mem, q, drv.desc_gpa, head)
    assert q.pop() is None
