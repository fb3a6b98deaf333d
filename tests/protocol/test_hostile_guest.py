"""Hostile guests against the real ``vhost-user-blk serve`` process.

The front-end is well behaved (memfd RAM with a hole, QEMU's setup order); the guest driver is
not: it writes raw descriptor tables and ring contents. After each case:

- a chain the ring walker rejects comes back in the used ring with length 0, IOERR in its
  status byte when that byte is reachable (a complete chain whose last descriptor is writable
  guest memory), never OK;
- a request-level error (bad header, out of range, unsupported) is a status, with the used
  length counting the bytes written (status included);
- the same queue then serves a good request, except after avail->idx runs more than a queue
  ahead, which breaks the ring (the other queue keeps going; a new session works);
- and the fixture's teardown checks the process: alive, no crash logged, no fd leaked, a fresh
  session works on both queues, the image equals its shadow (pattern + valid writes only).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.protocol.frontend import MiB, RegionSpec
from tests.protocol.serve_process import (
    BIG_AREA,
    CAPACITY,
    DWZ_SEG,
    QUEUE_AREA,
    REQ_HDR,
    SECTOR,
    SERIAL,
    STATUS_SENTINEL,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    BlkSession,
    ServeProcess,
)
from tests.support.driver_ring import (
    DESC,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from vhost_user.protocol import codec

NEXT = VIRTQ_DESC_F_NEXT
W = VIRTQ_DESC_F_WRITE
INDIRECT = VIRTQ_DESC_F_INDIRECT
HOLE = 1 * MiB + 0x1000
"""Guest physical address in the hole between the two RAM regions."""
REGION_A_END = 1 * MiB
TOP = 1 << 64
RING = 256
RESERVED = 32
"""Descriptors 0..31 of every ring are the test's (``serve_process.RESERVED_DESCRIPTORS``)."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    sp = ServeProcess(tmp_path_factory.mktemp("hostile-guest"))
    yield sp
    rc = sp.stop()
    assert rc == 0, sp.log_text()
    assert not sp.crash_lines(), "\n".join(sp.crash_lines())
    assert sp.restarts == 0, "a test killed the server"
    sp.shadow.check()


@pytest.fixture
def srv(server: ServeProcess) -> Iterator[ServeProcess]:
    server.ensure_running()
    yield server
    server.check_healthy()


@pytest.fixture
def s(srv: ServeProcess) -> Iterator[BlkSession]:
    with BlkSession.open(srv.socket, queues=(0, 1), size=RING) as session:
        yield session


def image_at(srv: ServeProcess, sector: int, n: int) -> bytes:
    return bytes(srv.shadow.data[sector * SECTOR : sector * SECTOR + n])


def still_serves(s: BlkSession, srv: ServeProcess, q: int) -> None:
    """The queue that saw a hostile chain serves the next good one."""
    got = s.request(q, VIRTIO_BLK_T_IN, 3, read_len=1024)
    assert (got.status, got.used_len, got.data) == (VIRTIO_BLK_S_OK, 1025, image_at(srv, 3, 1024))


def wait_for(s: BlkSession, q: int, done: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll ``done`` (woken by queue ``q``'s call eventfd, if it comes)."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        s.fe.wait_call(q, 0.05)


def expect_fault(s: BlkSession, q: int, head: int, status: int | None, *, reachable: bool) -> None:
    """``head`` comes back with length 0; its status byte (at ``status``) says IOERR when
    reachable and is never OK."""
    assert s.raw(q, head) == (head, 0)
    if status is not None:
        byte = s.get(status, 1)[0]
        if reachable:
            assert byte == VIRTIO_BLK_S_IOERR
        else:
            assert byte in (STATUS_SENTINEL, VIRTIO_BLK_S_IOERR)


# -- chains the ring walker rejects ------------------------------------------------------------

# Each builder writes raw descriptors on queue q (indices 0..31 are the test's) and returns
# (head, status gpa or None, whether the status byte is reachable).
Built = tuple[int, int | None, bool]


def _req(s: BlkSession, q: int, kind: int = VIRTIO_BLK_T_IN, sector: int = 5) -> tuple[int, int]:
    a = s.area(q)
    return s.header(a, kind, sector), s.status_at(a + 0x3000)


def loop_self(s: BlkSession, q: int) -> Built:
    hdr, status = _req(s, q)
    s.desc(q, 0, hdr, 16, NEXT, 0)
    return 0, status, False


def loop_two(s: BlkSession, q: int) -> Built:
    hdr, status = _req(s, q)
    s.desc(q, 0, hdr, 16, NEXT, 1)
    s.desc(q, 1, status, 1, W | NEXT, 0)
    return 0, status, False


def loop_after_ten(s: BlkSession, q: int) -> Built:
    hdr, status = _req(s, q)
    s.desc(q, 0, hdr, 16, NEXT, 1)
    for i in range(1, 10):
        s.desc(q, i, s.area(q) + 0x1000 + SECTOR * i, SECTOR, W | NEXT, i + 1)
    s.desc(q, 10, status, 1, W | NEXT, 5)
    return 0, status, False


def next_past_queue(s: BlkSession, q: int) -> Built:
    hdr, status = _req(s, q)
    s.desc(q, 0, hdr, 16, NEXT, RING)
    return 0, status, False


def next_ffff(s: BlkSession, q: int) -> Built:
    hdr, status = _req(s, q)
    s.desc(q, 0, hdr, 16, NEXT, 1)
    s.desc(q, 1, status, 1, W | NEXT, 0xFFFF)
    return 0, status, False


def head_past_queue(s: BlkSession, q: int) -> Built:
    return RING, None, False


def head_ffff(s: BlkSession, q: int) -> Built:
    return 0xFFFF, None, False


def _table(s: BlkSession, q: int) -> int:
    return s.area(q) + 0x10000


def _indirect_to(s: BlkSession, q: int, gpa: int, length: int, flags: int = INDIRECT) -> Built:
    _hdr, status = _req(s, q)
    s.desc(q, 0, gpa, length, flags, 1)
    return 0, status, False


def _valid_table(s: BlkSession, q: int) -> tuple[int, int]:
    hdr, status = _req(s, q)
    t = _table(s, q)
    ring = s.rings[q]
    ring.write_desc_at(t, hdr, 16, NEXT, 1)
    ring.write_desc_at(t + 16, s.area(q) + 0x1000, SECTOR, W | NEXT, 2)
    ring.write_desc_at(t + 32, status, 1, W, 0)
    return t, status


def indirect_nested(s: BlkSession, q: int) -> Built:
    t, status = _valid_table(s, q)
    s.rings[q].write_desc_at(t + 16, t, 48, INDIRECT, 0)
    s.desc(q, 0, t, 48, INDIRECT, 0)
    return 0, status, False


def indirect_with_next(s: BlkSession, q: int) -> Built:
    t, status = _valid_table(s, q)
    s.desc(q, 0, t, 48, INDIRECT | NEXT, 1)
    s.desc(q, 1, status, 1, W, 0)
    return 0, status, False


def indirect_len_40(s: BlkSession, q: int) -> Built:
    t, _ = _valid_table(s, q)
    return _indirect_to(s, q, t, 40)


def indirect_len_0(s: BlkSession, q: int) -> Built:
    t, _ = _valid_table(s, q)
    return _indirect_to(s, q, t, 0)


def indirect_len_huge(s: BlkSession, q: int) -> Built:
    t, _ = _valid_table(s, q)
    return _indirect_to(s, q, t, 0xFFFF_FFF0)


def indirect_1025_entries(s: BlkSession, q: int) -> Built:
    t, _ = _valid_table(s, q)
    return _indirect_to(s, q, t, 16 * 1025)


def indirect_in_hole(s: BlkSession, q: int) -> Built:
    return _indirect_to(s, q, HOLE, 48)


def indirect_straddles_hole(s: BlkSession, q: int) -> Built:
    return _indirect_to(s, q, REGION_A_END - 32, 64)


def indirect_wraps_2_64(s: BlkSession, q: int) -> Built:
    return _indirect_to(s, q, TOP - 32, 64)


def indirect_next_past_table(s: BlkSession, q: int) -> Built:
    t, status = _valid_table(s, q)
    s.rings[q].write_desc_at(t + 16, s.area(q) + 0x1000, SECTOR, W | NEXT, 3)
    s.desc(q, 0, t, 48, INDIRECT, 0)
    return 0, status, False


def indirect_loop(s: BlkSession, q: int) -> Built:
    t, status = _valid_table(s, q)
    s.rings[q].write_desc_at(t + 32, status, 1, W | NEXT, 0)
    s.desc(q, 0, t, 48, INDIRECT, 0)
    return 0, status, False


def _chain(s: BlkSession, q: int, bufs: list[tuple[int, int, int]]) -> None:
    """Raw descriptors 0..n-1 chained in order; flags as given plus NEXT."""
    for i, (gpa, length, flags) in enumerate(bufs):
        last = i == len(bufs) - 1
        s.desc(q, i, gpa, length, flags | (0 if last else NEXT), 0 if last else i + 1)


def _data_at(gpa: int, length: int, kind: int = VIRTIO_BLK_T_IN) -> object:
    def build(s: BlkSession, q: int) -> Built:
        hdr, status = _req(s, q, kind, sector=7)
        flags = W if kind == VIRTIO_BLK_T_IN else 0
        _chain(s, q, [(hdr, 16, 0), (gpa, length, flags), (status, 1, W)])
        return 0, status, True

    return build


def status_in_hole(s: BlkSession, q: int) -> Built:
    hdr, _ = _req(s, q, VIRTIO_BLK_T_OUT, sector=9)
    _chain(s, q, [(hdr, 16, 0), (s.area(q) + 0x1000, SECTOR, 0), (HOLE, 1, W)])
    return 0, None, False


def status_straddles_region_end(s: BlkSession, q: int) -> Built:
    hdr, _ = _req(s, q, VIRTIO_BLK_T_OUT, sector=9)
    _chain(s, q, [(hdr, 16, 0), (s.area(q) + 0x1000, SECTOR, 0), (REGION_A_END - 1, 2, W)])
    return 0, None, False


def readable_after_writable(s: BlkSession, q: int) -> Built:
    hdr, status = _req(s, q, VIRTIO_BLK_T_OUT, sector=9)
    a = s.area(q)
    _chain(s, q, [(hdr, 16, 0), (a + 0x1000, SECTOR, W), (a + 0x2000, SECTOR, 0), (status, 1, W)])
    return 0, status, True


def zero_length_in_middle(s: BlkSession, q: int) -> Built:
    hdr, status = _req(s, q, VIRTIO_BLK_T_OUT, sector=9)
    _chain(s, q, [(hdr, 16, 0), (s.area(q) + 0x1000, 0, 0), (status, 1, W)])
    return 0, status, True


def over_4gib_in_total(s: BlkSession, q: int) -> Built:
    hdr, status = _req(s, q)
    _chain(s, q, [(hdr, 16, 0), (BIG_AREA[0], 0x8000_0000, W), (BIG_AREA[0], 0x8000_0000, W)])
    s.desc(q, 2, BIG_AREA[0], 0x8000_0000, W | NEXT, 3)
    s.desc(q, 3, status, 1, W, 0)
    return 0, status, True


FAULTS = {
    "loop to itself": loop_self,
    "two-descriptor loop": loop_two,
    "loop after ten descriptors": loop_after_ten,
    "next index = queue size": next_past_queue,
    "next index 0xffff": next_ffff,
    "avail head = queue size": head_past_queue,
    "avail head 0xffff": head_ffff,
    "nested indirect": indirect_nested,
    "indirect with NEXT": indirect_with_next,
    "indirect length 40": indirect_len_40,
    "indirect length 0": indirect_len_0,
    "indirect length 0xfffffff0": indirect_len_huge,
    "indirect of 1025 entries": indirect_1025_entries,
    "indirect table in the hole": indirect_in_hole,
    "indirect table straddles the hole": indirect_straddles_hole,
    "indirect table wraps 2^64": indirect_wraps_2_64,
    "indirect next past its table": indirect_next_past_table,
    "loop inside an indirect table": indirect_loop,
    "read buffer in the hole": _data_at(HOLE, SECTOR),
    "read buffer straddles region end": _data_at(REGION_A_END - 256, SECTOR),
    "read buffer spans the hole": _data_at(REGION_A_END - 256, MiB + 768),
    "read buffer past all memory": _data_at(8 * MiB, SECTOR),
    "read buffer wraps 2^64": _data_at(TOP - 256, SECTOR),
    "read buffer at 2^64 - 1": _data_at(TOP - 1, 1),
    "read buffer of 0xffffffff bytes": _data_at(0x1000, 0xFFFF_FFFF),
    "write buffer in the hole": _data_at(HOLE, SECTOR, VIRTIO_BLK_T_OUT),
    "write buffer wraps 2^64": _data_at(TOP - 256, SECTOR, VIRTIO_BLK_T_OUT),
    "write buffer of 0xffffffff bytes": _data_at(0x1000, 0xFFFF_FFFF, VIRTIO_BLK_T_OUT),
    "status byte in the hole": status_in_hole,
    "status straddles region end": status_straddles_region_end,
    "readable after writable": readable_after_writable,
    "zero-length descriptor": zero_length_in_middle,
    "chain over 4 GiB": over_4gib_in_total,
}


@pytest.mark.parametrize("q", [0, 1])
@pytest.mark.parametrize("case", list(FAULTS), ids=list(FAULTS))
def test_faulty_chain_is_returned_and_queue_goes_on(
    s: BlkSession, srv: ServeProcess, case: str, q: int
) -> None:
    head, status, reachable = FAULTS[case](s, q)  # type: ignore[operator]
    expect_fault(s, q, head, status, reachable=reachable)
    still_serves(s, srv, q)


def test_faulty_and_good_chains_in_one_batch(s: BlkSession, srv: ServeProcess) -> None:
    """Faults interleaved with good requests, all made available before one kick."""
    ring = s.rings[0]
    loop_two(s, 0)
    ring.push_head(0, publish=False)
    good = ring.add_chain(
        [
            (s.header(0x20000, VIRTIO_BLK_T_IN, 11), 16, False),
            (0x21000, SECTOR, True),
            (s.status_at(0x22000), 1, True),
        ],
        publish=False,
    )
    ring.push_head(RING + 5, publish=False)
    ring.publish()
    s.kick(0)
    used = s.wait_used(0, 3)
    assert used == [(0, 0), (good, SECTOR + 1), (RING + 5, 0)]
    assert s.get(0x22000, 1)[0] == VIRTIO_BLK_S_OK
    assert s.get(0x21000, SECTOR) == image_at(srv, 11, SECTOR)
    still_serves(s, srv, 0)


# -- rings broken beyond repair ----------------------------------------------------------------


@pytest.mark.parametrize("jump", [RING + 1, 0x8000, 0xFFFF], ids=["size+1", "0x8000", "backwards"])
def test_avail_idx_jump_breaks_only_that_queue(srv: ServeProcess, jump: int) -> None:
    with BlkSession.open(srv.socket, queues=(0, 1), size=RING) as s:
        still_serves(s, srv, 0)
        ring = s.rings[0]
        ring.set_avail_idx(ring.avail_idx + jump)
        s.kick(0)
        s.assert_no_used(0, 0.5)
        # The other queue of the same device is not affected.
        still_serves(s, srv, 1)
        # A broken ring stays stopped: more kicks do nothing.
        s.kick(0)
        s.assert_no_used(0, 0.2)
    # The teardown's fresh session (both queues) proves the ring works again after a reset.


def test_avail_idx_jump_of_exactly_the_queue_size_is_served(
    s: BlkSession, srv: ServeProcess
) -> None:
    """Every slot available at once, all naming the same (valid) head: legal, if odd."""
    hdr, status = _req(s, 0, VIRTIO_BLK_T_FLUSH)
    _chain(s, 0, [(hdr, 16, 0), (status, 1, W)])
    ring = s.rings[0]
    for _ in range(RING):
        ring.push_head(0, publish=False)
    ring.publish()
    s.kick(0)
    assert s.wait_used(0, RING) == [(0, 1)] * RING
    assert s.get(status, 1)[0] == VIRTIO_BLK_S_OK
    still_serves(s, srv, 0)


# -- well-formed chains, bad requests ----------------------------------------------------------


def _simple(
    s: BlkSession,
    q: int,
    header: bytes,
    *,
    readable: bytes = b"",
    writable: int = 0,
    status_writable: bool = True,
) -> tuple[int, int, int, int]:
    """header (R), optional data (R), optional buffer (W), status: (used len, status byte,
    writable gpa, head)."""
    a = s.area(q)
    bufs = [(s.put(a, header), len(header), 0)] if header else []
    if readable:
        bufs.append((s.put(a + 0x1000, readable), len(readable), 0))
    if writable:
        bufs.append((s.put(a + 0x8000, b"\xee" * writable), writable, W))
    status = s.status_at(a + 0x40000)
    bufs.append((status, 1, W if status_writable else 0))
    _chain(s, q, bufs)
    head, used_len = s.raw(q, 0)
    assert head == 0
    return used_len, s.get(status, 1)[0], a + 0x8000, head


def hdr(kind: int, sector: int = 0) -> bytes:
    return REQ_HDR.pack(kind, 0, sector)


IOERR_REQUESTS = {
    "header of 8 bytes": (hdr(VIRTIO_BLK_T_IN)[:8], 0, 512),
    "header of 15 bytes": (hdr(VIRTIO_BLK_T_IN)[:15], 0, 512),
    "no header at all": (b"", 0, 512),
    "read at capacity": (hdr(VIRTIO_BLK_T_IN, CAPACITY), 0, 512),
    "read across the end": (hdr(VIRTIO_BLK_T_IN, CAPACITY - 1), 0, 1024),
    "read at sector 2^64-1": (hdr(VIRTIO_BLK_T_IN, TOP - 1), 0, 512),
    "read at sector 2^55 (offset 2^64)": (hdr(VIRTIO_BLK_T_IN, 1 << 55), 0, 512),
    "read at sector 2^55-1": (hdr(VIRTIO_BLK_T_IN, (1 << 55) - 1), 0, 512),
    "read of 100 bytes": (hdr(VIRTIO_BLK_T_IN, 0), 0, 100),
    "write at capacity": (hdr(VIRTIO_BLK_T_OUT, CAPACITY), 512, 0),
    "write across the end": (hdr(VIRTIO_BLK_T_OUT, CAPACITY - 1), 1024, 0),
    "write at sector 2^64-1": (hdr(VIRTIO_BLK_T_OUT, TOP - 1), 512, 0),
    "write at sector 2^55 - 1": (hdr(VIRTIO_BLK_T_OUT, (1 << 55) - 1), 512, 0),
    "write of 100 bytes": (hdr(VIRTIO_BLK_T_OUT, 20), 100, 0),
}


@pytest.mark.parametrize("case", list(IOERR_REQUESTS), ids=list(IOERR_REQUESTS))
def test_bad_request_gets_ioerr_and_touches_nothing(
    s: BlkSession, srv: ServeProcess, case: str
) -> None:
    header, nwrite, nread = IOERR_REQUESTS[case]
    used_len, status, rd, _ = _simple(s, 0, header, readable=b"\xab" * nwrite, writable=nread)
    assert (status, used_len) == (VIRTIO_BLK_S_IOERR, 1)
    if nread:
        assert s.get(rd, nread) == b"\xee" * nread, "a failed read wrote guest memory"
    still_serves(s, srv, 0)


@pytest.mark.parametrize("kind", [99, 0xFFFF_FFFF, 10, 14])
def test_unknown_request_type_is_unsupp(s: BlkSession, srv: ServeProcess, kind: int) -> None:
    used_len, status, _, _ = _simple(s, 1, hdr(kind, 1), readable=b"\xab" * 512, writable=512)
    assert (status, used_len) == (VIRTIO_BLK_S_UNSUPP, 1)
    still_serves(s, srv, 1)


def test_status_in_a_read_only_descriptor_is_not_written(s: BlkSession, srv: ServeProcess) -> None:
    """A valid write whose last descriptor is device-readable: no status byte, so the device
    must neither write it nor execute the request."""
    used_len, status, _, _ = _simple(
        s, 0, hdr(VIRTIO_BLK_T_OUT, 30), readable=b"\xab" * 512, status_writable=False
    )
    assert (used_len, status) == (0, STATUS_SENTINEL)
    still_serves(s, srv, 0)


def test_header_split_into_single_bytes_is_fine(s: BlkSession, srv: ServeProcess) -> None:
    a = s.area(0)
    s.put(a, hdr(VIRTIO_BLK_T_IN, 12))
    bufs = [(a + i, 1, 0) for i in range(16)] + [
        (a + 0x1000, 512, W),
        (s.status_at(a + 0x3000), 1, W),
    ]
    _chain(s, 0, bufs)
    assert s.raw(0, 0) == (0, 513)
    assert s.get(a + 0x3000, 1)[0] == VIRTIO_BLK_S_OK
    assert s.get(a + 0x1000, 512) == image_at(srv, 12, 512)


@pytest.mark.parametrize("size", [0, 1, 4, 19, 20, 64])
def test_get_id_fills_at_most_twenty_bytes(s: BlkSession, srv: ServeProcess, size: int) -> None:
    used_len, status, buf, _ = _simple(s, 0, hdr(VIRTIO_BLK_T_GET_ID), writable=size)
    expected = SERIAL.encode().ljust(20, b"\0")[: min(size, 20)]
    assert (status, used_len) == (VIRTIO_BLK_S_OK, len(expected) + 1)
    if size:
        got = s.get(buf, size)
        assert got[: len(expected)] == expected
        assert got[len(expected) :] == b"\xee" * (size - len(expected))
    still_serves(s, srv, 0)


def segs(*items: tuple[int, int, int]) -> bytes:
    return b"".join(DWZ_SEG.pack(*i) for i in items)


DWZ_CASES = {
    "257 segments": (VIRTIO_BLK_T_WRITE_ZEROES, segs(*[(40 + i, 1, 0) for i in range(257)]), 2),
    "no segment": (VIRTIO_BLK_T_WRITE_ZEROES, b"", 2),
    "20 bytes of segment": (VIRTIO_BLK_T_WRITE_ZEROES, segs((40, 1, 0)) + b"\0" * 4, 2),
    "unknown flag": (VIRTIO_BLK_T_WRITE_ZEROES, segs((40, 1, 2)), 2),
    "discard with UNMAP": (VIRTIO_BLK_T_DISCARD, segs((40, 1, 1)), 2),
    "discard unknown flag": (VIRTIO_BLK_T_DISCARD, segs((40, 1, 0x8000_0000)), 2),
    "out of range": (VIRTIO_BLK_T_WRITE_ZEROES, segs((CAPACITY - 1, 2, 0)), 1),
    "discard out of range": (VIRTIO_BLK_T_DISCARD, segs((CAPACITY, 1, 0)), 1),
    "sector 2^64-1": (VIRTIO_BLK_T_WRITE_ZEROES, segs((TOP - 1, 1, 0)), 1),
    "sector 2^55": (VIRTIO_BLK_T_DISCARD, segs((1 << 55, 1, 0)), 1),
    "too many sectors": (VIRTIO_BLK_T_WRITE_ZEROES, segs((0, 0xFFFF_FFFF, 0)), 1),
    "valid then out of range": (
        VIRTIO_BLK_T_WRITE_ZEROES,
        segs((40, 8, 1), (50, 8, 0), (CAPACITY, 1, 0)),
        1,
    ),
    "valid then bad flag": (VIRTIO_BLK_T_DISCARD, segs((40, 8, 0), (60, 8, 4)), 2),
}


@pytest.mark.parametrize("case", list(DWZ_CASES), ids=list(DWZ_CASES))
def test_bad_discard_and_write_zeroes(s: BlkSession, srv: ServeProcess, case: str) -> None:
    kind, data, expected = DWZ_CASES[case]
    used_len, status, _, _ = _simple(s, 1, hdr(kind), readable=data)
    assert (status, used_len) == (expected, 1)
    still_serves(s, srv, 1)


def test_valid_write_zeroes_zeroes_exactly_its_ranges(s: BlkSession, srv: ServeProcess) -> None:
    used_len, status, _, _ = _simple(
        s, 0, hdr(VIRTIO_BLK_T_WRITE_ZEROES), readable=segs((100, 3, 0), (200, 1, 1))
    )
    assert (status, used_len) == (VIRTIO_BLK_S_OK, 1)
    srv.shadow.write(100 * SECTOR, bytes(3 * SECTOR))
    srv.shadow.write(200 * SECTOR, bytes(SECTOR))
    srv.shadow.check()


# -- big, tiny and careless guests -------------------------------------------------------------


def _tiny_buffers(s: BlkSession, kind: int, sector: int) -> tuple[list[tuple[int, int, bool]], int]:
    """1024 buffers: a header in 16 one-byte pieces, 1024 data bytes in 1007 pieces, status."""
    a = s.area(0)
    s.put(a, hdr(kind, sector))
    bufs = [(a + i, 1, False) for i in range(16)]
    data = a + 0x1000
    pos = 0
    writable = kind == VIRTIO_BLK_T_IN
    for n in [2] * 17 + [1] * 990:
        bufs.append((data + pos, n, writable))
        pos += n
    assert pos == 1024
    bufs.append((s.status_at(a + 0x3000), 1, True))
    assert len(bufs) == 1024
    return bufs, data


@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_chain_of_1024_tiny_descriptors(srv: ServeProcess, indirect: bool) -> None:
    size = RING if indirect else 1024
    with BlkSession.open(srv.socket, queues=(0,), size=size) as s:
        payload = bytes(range(256)) * 4
        for kind in (VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_IN):
            bufs, data = _tiny_buffers(s, kind, 60)
            if kind == VIRTIO_BLK_T_OUT:
                s.put(data, payload)
            else:
                s.put(data, b"\xee" * 1024)
            if indirect:
                head = s.rings[0].add_chain(bufs, indirect=True)
                s.kick(0)
                used = s.wait_used(0)
            else:
                flags = [(g, n, W if w else 0) for g, n, w in bufs]
                _chain(s, 0, flags)
                head = 0
                used = [s.raw(0, 0)]
            expected = 1025 if kind == VIRTIO_BLK_T_IN else 1
            assert used == [(head, expected)]
            assert s.get(s.area(0) + 0x3000, 1)[0] == VIRTIO_BLK_S_OK
            if kind == VIRTIO_BLK_T_OUT:
                srv.shadow.write(60 * SECTOR, payload)
            else:
                assert s.get(data, 1024) == payload
        still_serves(s, srv, 0)


def test_guest_that_never_reads_the_used_ring(srv: ServeProcess) -> None:
    """The driver republishes the same chain forever and never consumes used entries (and
    never moves used_event): the device keeps completing, wrapping the used ring."""
    size = 64
    with BlkSession.open(srv.socket, queues=(0,), size=size) as s:
        hdr_gpa, status = _req(s, 0, VIRTIO_BLK_T_IN, 2)
        _chain(s, 0, [(hdr_gpa, 16, 0), (s.area(0) + 0x1000, 512, W), (status, 1, W)])
        ring = s.rings[0]
        for round_ in range(1, 5):
            for _ in range(size):
                ring.push_head(0, publish=False)
            ring.publish()
            s.kick(0)
            target = round_ * size
            wait_for(s, 0, lambda: ring.used_idx == target)  # noqa: B023
        assert ring.last_used == 0
        ring.used_entries()  # catch up now, so the good request below sees only its own
        still_serves(s, srv, 0)


@pytest.mark.parametrize("offset", [-1, 1, 2, 1000, 0x7FFF, 0x8000])
def test_odd_used_event_values(srv: ServeProcess, offset: int) -> None:
    """used_event far behind, just ahead, half the index space away...: completions are never
    lost (the used ring always has them) and interrupts resume once used_event is sane."""
    with BlkSession.open(srv.socket, queues=(0,), size=RING) as s:
        ring = s.rings[0]
        for _ in range(3):
            ring.set_used_event((ring.last_used + offset) & 0xFFFF)
            hdr_gpa, status = _req(s, 0, VIRTIO_BLK_T_IN, 4)
            head = ring.add_chain(
                [(hdr_gpa, 16, False), (s.area(0) + 0x1000, 512, True), (status, 1, True)]
            )
            s.kick(0)
            wait_for(s, 0, lambda: ring.used_idx != ring.last_used)
            assert ring.used_entries() == [(head, 513)]
        # Drain any interrupt owed, then ask for the next one the normal way: it must come.
        s.fe.wait_call(0, 0.05)
        ring.set_used_event(ring.last_used)
        hdr_gpa, status = _req(s, 0, VIRTIO_BLK_T_FLUSH)
        head = ring.add_chain([(hdr_gpa, 16, False), (status, 1, True)])
        s.kick(0)
        assert s.fe.wait_call(0, 10.0), "no interrupt although used_event asked for one"
        assert ring.used_entries() == [(head, 1)]


def test_no_interrupt_flag_without_event_idx(srv: ServeProcess) -> None:
    with BlkSession.open(srv.socket, queues=(1,), size=RING, event_idx=False) as s:
        s.rings[1].set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
        for _ in range(3):
            still_serves(s, srv, 1)
        s.rings[1].set_avail_flags(0)
        still_serves(s, srv, 1)


def test_writable_buffer_over_the_driver_rings_own_memory(srv: ServeProcess) -> None:
    """DMA into the guest's own descriptor table of another queue: guest memory, so allowed;
    the device must not care (and the image must not change)."""
    with BlkSession.open(srv.socket, queues=(0,), size=RING) as s:
        other = s.add_ring(1, RING)
        target = other.desc_gpa
        hdr_gpa, status = _req(s, 0, VIRTIO_BLK_T_IN, 0)
        _chain(s, 0, [(hdr_gpa, 16, 0), (target, 4096, W), (status, 1, W)])
        assert s.raw(0, 0) == (0, 4097)
        assert s.get(target, 4096) == image_at(srv, 0, 4096)


@pytest.mark.parametrize("event_idx", [True, False])
def test_indices_wrap_around_65535(srv: ServeProcess, event_idx: bool) -> None:
    """Both free-running u16 indices start just below the wrap (SET_VRING_BASE 0xfff0) and
    cross it, in batches and one by one."""
    fe, memory, features = BlkSession.connect(srv.socket, event_idx=event_idx)
    s = BlkSession(fe, memory, {}, features)
    try:
        ring = s.add_ring(0, 64, base=0xFFF0)
        for _ in range(12):
            still_serves(s, srv, 0)
        a = s.area(0)
        heads = []
        for i in range(8):
            gpa = a + 0x10000 + i * 0x1000
            s.header(gpa, VIRTIO_BLK_T_IN, i)
            heads.append(
                ring.add_chain(
                    [(gpa, 16, False), (gpa + 0x100, 512, True), (s.status_at(gpa + 16), 1, True)],
                    publish=False,
                )
            )
        ring.publish()
        s.kick(0)
        assert s.wait_used(0, 8) == [(h, 513) for h in heads]
        for _ in range(12):
            still_serves(s, srv, 0)
        assert ring.avail_idx == (0xFFF0 + 32) & 0xFFFF
        s.fe.set_vring_enable(0, False)
        assert s.fe.get_vring_base(0) == ring.avail_idx
    finally:
        fe.close()
        memory.close()


def test_no_call_fd(srv: ServeProcess) -> None:
    """A front-end that polls (SET_VRING_CALL without fd): the queue still works."""
    with BlkSession.open(srv.socket, queues=(0,), size=RING) as s:
        s.fe.call(codec.SetVringCall(0, None))
        for _ in range(3):
            still_serves(s, srv, 0)


ADJACENT = (
    RegionSpec(0, 1 * MiB, 0x7F00_0000_0000),
    RegionSpec(1 * MiB, 1 * MiB, 0x7F20_0000_0000, mmap_offset=0x3000),
    RegionSpec(2 * MiB, 2 * MiB, 0x7F10_0000_0000),
)
"""Three memfds at adjacent guest addresses (not adjacent in the front-end's address space)."""


@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_buffers_and_tables_straddling_adjacent_regions(srv: ServeProcess, indirect: bool) -> None:
    """Legal, if unusual: a data buffer and an indirect table that run from one region into
    the next. They must work, and land in the right bytes of both memfds."""
    with BlkSession.open(srv.socket, queues=(0,), size=RING, layout=ADJACENT) as s:
        ring = s.rings[0]
        edge = 1 * MiB
        if indirect:
            ring._indirect_area = (2 * MiB - 32, 0x1000)
            ring._indirect_next = 0
        payload = bytes(range(256)) * 8
        hdr = s.header(s.area(0), VIRTIO_BLK_T_OUT, 70)
        status = s.status_at(hdr + 16)
        s.put(edge - 1000, payload)
        head = ring.add_chain(
            [(hdr, 16, False), (edge - 1000, 2048, False), (status, 1, True)], indirect
        )
        s.kick(0)
        assert s.wait_used(0) == [(head, 1)]
        assert s.get(status, 1)[0] == VIRTIO_BLK_S_OK
        srv.shadow.write(70 * SECTOR, payload)
        s.header(hdr, VIRTIO_BLK_T_IN, 70)
        s.put(edge - 700, b"\xee" * 2048)
        head = ring.add_chain(
            [(hdr, 16, False), (edge - 700, 2048, True), (status, 1, True)], indirect
        )
        s.kick(0)
        assert s.wait_used(0) == [(head, 2049)]
        assert s.get(edge - 700, 2048) == payload
        still_serves(s, srv, 0)


# -- randomized: random descriptor tables and ring contents ------------------------------------

TABLES = 0x30000
"""Indirect tables (queue-area relative). Below the pool and the scratch area, which writes
grow away from."""
POOL = 0x40000
"""256 16-byte header slots of types IN / FLUSH / GET_ID / unknown only: no header assembled
from slot prefixes can be a write (see the last test), so whatever the walker makes of a
random chain, the image must not change."""
SCRATCH = (0x42000, 0xE000)
"""Where device-writable descriptors point (at most 0x3000 bytes past its end)."""
POOL_TYPES = [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, 0x7F7F7F7F]

# Never guest memory, so never a header made of bytes the device wrote.
outside_readable = st.sampled_from([HOLE, REGION_A_END, TOP - 8, TOP - 1, 8 * MiB, 1 << 63])
outside_writable = st.one_of(outside_readable, st.just(REGION_A_END - 8))
hostile_lengths = st.sampled_from([0, 15, 17, 513, 0xFFFF_FFFF, 0x8000_0000, 0x3000])

Desc = tuple[int, int, int, int]
"""addr, len, flags, next"""


@st.composite
def buffer(draw: st.DrawFn, base: int, writable: bool) -> tuple[int, int]:
    """A plausible buffer: readable ones start at a header slot, writable ones lie in the
    scratch area."""
    if writable:
        gpa = base + SCRATCH[0] + 16 * draw(st.integers(0, SCRATCH[1] // 16))
        return gpa, draw(st.sampled_from([1, 512, 513, 1024, 4096, 4097, 20]))
    gpa = base + POOL + 16 * draw(st.integers(0, 255))
    return gpa, draw(st.sampled_from([16, 16, 4, 8, 32, 528]))


@st.composite
def chain(draw: st.DrawFn, base: int) -> list[tuple[int, int, int]]:
    """(gpa, length, flags without NEXT): readable buffers, then writable ones; one time in
    four, one buffer is moved outside memory or given a hostile length, one time in ten the
    order is shuffled."""
    n_read = draw(st.integers(0, 3))
    n_write = draw(st.integers(0 if n_read else 1, 3))
    bufs = [(*draw(buffer(base, False)), 0) for _ in range(n_read)]
    bufs += [(*draw(buffer(base, True)), W) for _ in range(n_write)]
    if draw(st.integers(0, 3)) == 3:
        i = draw(st.integers(0, len(bufs) - 1))
        gpa, length, flags = bufs[i]
        if draw(st.booleans()):
            gpa = draw(outside_writable if flags & W else outside_readable)
        else:
            length = draw(hostile_lengths)
        bufs[i] = (gpa, length, flags)
    if draw(st.integers(0, 9)) == 9:
        bufs = draw(st.permutations(bufs))
    return bufs


MUTATION_VALUES = {
    # Never an address in guest memory: see outside_readable.
    "addr": [HOLE, TOP - 1, 8 * MiB],
    "len": [0, 1, 16, 0xFFFF_FFFF],
    "flags": [0, NEXT, W, W | NEXT, INDIRECT, INDIRECT | NEXT, 0x18, 0xFFFF],
    "next": [0, 1, 7, RESERVED, RING, 0xFFFF],
}
mutation = st.sampled_from(sorted(MUTATION_VALUES)).flatmap(
    lambda field: st.tuples(
        st.integers(0, RESERVED - 1), st.just(field), st.sampled_from(MUTATION_VALUES[field])
    )
)


@dataclass(frozen=True)
class Scenario:
    q: int
    pool: list[tuple[int, int, int]]
    chains: list[list[tuple[int, int, int]]]
    indirect: list[tuple[int, int, int]]
    """A table the last chain points at (INDIRECT), if any."""
    mutations: list[tuple[int, str, int]]
    extra_heads: list[int]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    q = draw(st.sampled_from([0, 1]))
    base = q * QUEUE_AREA
    sectors = st.one_of(
        st.sampled_from([0, 1, 100, CAPACITY - 1, CAPACITY, TOP - 1]), st.integers(0, TOP - 1)
    )
    header = st.tuples(st.sampled_from(POOL_TYPES), st.integers(0, 0xFFFF_FFFF), sectors)
    return Scenario(
        q=q,
        pool=draw(st.lists(header, min_size=1, max_size=8)),
        chains=draw(st.lists(chain(base), min_size=1, max_size=5)),
        indirect=draw(st.one_of(st.just([]), chain(base))),
        mutations=draw(st.one_of(st.just([]), st.lists(mutation, max_size=3))),
        extra_heads=draw(
            st.lists(st.one_of(st.integers(0, 40), st.sampled_from([RING, 0xFFFF])), max_size=2)
        ),
    )


def _lay_out(s: BlkSession, sc: Scenario, base: int) -> list[int]:
    """Write the scenario's chains into descriptors 0..RESERVED-1 (and its indirect table);
    returns the heads to make available."""
    q = sc.q
    table: list[Desc] = []
    heads = []
    for n, bufs in enumerate(sc.chains):
        head = len(table)
        if head + len(bufs) + 1 > RESERVED:
            break
        heads.append(head)
        for i, (gpa, length, flags) in enumerate(bufs):
            last = i == len(bufs) - 1
            table.append((gpa, length, flags | (0 if last else NEXT), len(table) + 1))
        if sc.indirect and n == len(sc.chains) - 1:
            if table and len(table) > head:
                gpa, length, flags, _ = table[-1]
                table[-1] = (gpa, length, flags | NEXT, len(table))
            table.append((base + TABLES, 16 * len(sc.indirect), INDIRECT, 0))
    for index, field, value in sc.mutations:
        while index >= len(table):
            table.append((0, 0, 0, 0))
        gpa, length, flags, nxt = table[index]
        if field == "addr":
            gpa = value
        elif field == "len":
            length = value
        elif field == "flags":
            flags = value
        else:
            nxt = value
        table[index] = (gpa, length, flags, nxt)
    for i, (gpa, length, flags, nxt) in enumerate(table):
        s.desc(q, i, gpa, length, flags, nxt)
    for i, (gpa, length, flags) in enumerate(sc.indirect):
        last = i == len(sc.indirect) - 1
        s.rings[q].write_desc_at(
            base + TABLES + 16 * i, gpa, length, flags | (0 if last else NEXT), 0 if last else i + 1
        )
    return heads + sc.extra_heads


@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(sc=scenarios())
def test_random_rings_through_the_real_process(server: ServeProcess, sc: Scenario) -> None:
    """Random chains, mostly plausible, some mutated, through the real process. Whatever the
    walker and the device make of them: every head comes back once (in any order: requests
    that wait for storage complete after those that do not), no used length exceeds
    what the chain offered, the queue keeps serving, the image never changes."""
    server.ensure_running()
    q = sc.q
    base = q * QUEUE_AREA
    with BlkSession.open(server.socket, queues=(q,), size=RING) as s:
        for i in range(256):
            kind, reserved, sector = sc.pool[i % len(sc.pool)]
            s.put(base + POOL + 16 * i, REQ_HDR.pack(kind, reserved, sector))
        heads = _lay_out(s, sc, base)
        # Bound on any used length: all device-writable bytes anywhere in both tables.
        table = s.get(s.rings[q].desc_gpa, 16 * RESERVED) + s.get(base + TABLES, 16 * 16)
        offered = sum(n for _, n, f, _ in DESC.iter_unpack(table) if f & W)
        ring = s.rings[q]
        for h in heads:
            ring.push_head(h, publish=False)
        ring.publish()
        s.kick(q)
        used = s.wait_used(q, len(heads))
        assert sorted(h for h, _ in used) == sorted(heads)
        assert all(n <= offered for _, n in used)
        event(f"{sum(1 for _, n in used if n)} of {len(used)} chains served")
        still_serves(s, server, q)
    server.shadow.check()
    assert server.alive()
    assert not server.crash_lines(), "\n".join(server.crash_lines())


def test_random_part_left_the_server_healthy(server: ServeProcess) -> None:
    assert server.restarts == 0, "the randomized test killed the server"
    server.check_healthy()


def test_pool_types_cannot_compose_a_write() -> None:
    """The random test's premise: every byte of a pool type is 00, 04, 08 or 7f, so no header
    assembled from slot prefixes has type OUT, DISCARD, WRITE_ZEROES or SECURE_ERASE."""
    type_bytes = {b for t in POOL_TYPES for b in struct.pack("<I", t)}
    assert type_bytes == {0x00, 0x04, 0x08, 0x7F}
    for kind in (VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES, 14):
        assert not set(struct.pack("<I", kind)) <= type_bytes
