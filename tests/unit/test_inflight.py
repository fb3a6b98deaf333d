"""Inflight tracking (vhost_user.ring.inflight) on a real split ring in guest memory: a queue
that "dies" with chains popped and not returned leaves them to its successor, which resubmits
exactly those, once, in pop order, repairs used_idx, and goes on from the right avail index;
hostile areas are refused. The successor is a new SplitVirtqueue on the same memory and area,
as a restarted backend is (QEMU's SET_VRING_BASE after a crash says the used index)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from memory import GuestMemory
from tests.support.driver_ring import DriverRing
from vhost_user.ring.inflight import InflightArea, InflightError, queue_region_size, state_offset
from vhost_user.ring.split import SplitVirtqueue

SIZE = 8
RING = 0x1000
BUF = 0x10000


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with GuestMemory.allocate(0x40000) as m:
        yield m


@pytest.fixture
def area() -> Iterator[InflightArea]:
    a, fd = InflightArea.create(2, SIZE)
    os.close(fd)
    try:
        yield a
    finally:
        a.close()


def _queue(drv: DriverRing, area: InflightArea, next_avail: int) -> SplitVirtqueue:
    return SplitVirtqueue(
        drv.memory,
        drv.size,
        drv.desc_gpa,
        drv.avail_gpa,
        drv.used_gpa,
        event_idx=False,
        next_avail_idx=next_avail,
        inflight=area.queues[0],
    )


def _add(drv: DriverRing, n: int) -> list[int]:
    return [drv.add_chain([(BUF + 0x100 * i, 16, True)]) for i in range(n)]


def test_a_dead_queues_requests_are_resubmitted_once_in_order(
    mem: GuestMemory, area: InflightArea
) -> None:
    drv = DriverRing.at(mem, RING, SIZE)
    heads = _add(drv, 4)
    q = _queue(drv, area, 0)
    popped = [q.pop() for _ in range(3)]
    assert [c.head for c in popped if c is not None] == heads[:3]
    q.push_used(heads[0], 16)  # one completes; two stay in flight; one never popped
    assert sorted(area.queues[0].in_flight()) == sorted(heads[1:3])
    # "kill -9": the queue object is simply gone. QEMU's SET_VRING_BASE is the used index.
    successor = _queue(drv, area, drv.used_idx)
    again = [successor.pop() for _ in range(3)]
    assert [c.head for c in again if c is not None] == [heads[1], heads[2], heads[3]]
    assert successor.pop() is None
    for c in again:
        assert c is not None
        successor.push_used(c.head, 16)
    assert [h for h, _ in drv.used_entries()] == heads
    assert area.queues[0].in_flight() == []
    assert area.queues[0].used_idx == drv.used_idx == 4


def test_a_death_between_used_idx_and_the_flag_is_repaired(
    mem: GuestMemory, area: InflightArea
) -> None:
    drv = DriverRing.at(mem, RING, SIZE)
    heads = _add(drv, 2)
    q = _queue(drv, area, 0)
    first = q.pop()
    assert first is not None
    region = area.queues[0]
    # The process died after publishing used->idx, before clearing the flag and used_idx:
    # replay exactly that prefix of push_used by hand.
    region.publishing(first.head)
    mem.write_u32(drv.used_gpa + 4, first.head)
    mem.write_u32(drv.used_gpa + 8, 16)
    mem.write_u16(drv.used_gpa + 2, 1)
    assert region.in_flight() == [first.head] and region.used_idx == 0
    successor = _queue(drv, area, 1)
    assert region.in_flight() == [] and region.used_idx == 1  # repaired, not resubmitted
    nxt = successor.pop()
    assert nxt is not None and nxt.head == heads[1]
    assert successor.pop() is None


def test_a_clean_stop_leaves_nothing_to_resubmit(mem: GuestMemory, area: InflightArea) -> None:
    drv = DriverRing.at(mem, RING, SIZE)
    for round_ in range(3):  # across index wrap of the ring slots
        heads = _add(drv, 5)
        q = _queue(drv, area, drv.used_idx)
        for h in heads:
            c = q.pop()
            assert c is not None and c.head == h
            q.push_used(h, 1)
        assert q.pop() is None
        assert [x for x, _ in drv.used_entries()] == heads, round_


def test_garbage_in_the_area_is_reset_not_followed(mem: GuestMemory, area: InflightArea) -> None:
    area.view[:] = b"\xff" * len(area.view)
    drv = DriverRing.at(mem, RING, SIZE)
    heads = _add(drv, 1)
    q = _queue(drv, area, 0)
    c = q.pop()
    assert c is not None and c.head == heads[0]
    assert q.pop() is None


def _memfd(size: int) -> int:
    fd = os.memfd_create("inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    return fd


@pytest.mark.parametrize(
    ("size", "offset", "queues", "qsize", "match"),
    [
        (64, 0, 1, SIZE, "does not hold"),
        (4096, 64, 1, SIZE, "past the end"),
        (4096, 3, 1, SIZE, "aligned"),
        (4096, 0, 0, SIZE, "not a queue set"),
        (1 << 40, 0, 1, SIZE, "does not hold"),
    ],
)
def test_hostile_areas_are_refused(
    size: int, offset: int, queues: int, qsize: int, match: str
) -> None:
    fd = _memfd(4096)
    try:
        with pytest.raises(InflightError, match=match):
            InflightArea(fd, size, offset, queues, qsize)
    finally:
        os.close(fd)


def test_a_pipe_is_no_area() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(InflightError, match="not a regular file"):
            InflightArea(r, queue_region_size(SIZE), 0, 1, SIZE)
    finally:
        os.close(r)
        os.close(w)


def test_the_devices_region_follows_the_queues_on_a_page() -> None:
    area, fd = InflightArea.create(2, SIZE, state_size=10000)
    try:
        start = state_offset(2, SIZE)
        assert start % 4096 == 0 and start >= 2 * queue_region_size(SIZE)
        assert area.mmap_size == start + 10000 == os.fstat(fd).st_size
        assert area.state is not None and len(area.state) == 10000 and not any(area.state)
        area.state[:4] = b"kept"
        again = InflightArea(fd, area.mmap_size, 0, 2, SIZE, state_size=10000)
        assert again.state is not None and bytes(again.state[:4]) == b"kept"
        again.close()
        # An area made for a device that wanted nothing (another backend's) has no state.
        small = InflightArea(fd, start, 0, 2, SIZE, state_size=10000)
        assert small.state is None
        small.close()
    finally:
        area.close()
        os.close(fd)
