"""virtio-blk wire layouts and the pure request parser (blkdev.virtio_blk)."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blkdev import virtio_blk as vb
from vhost_user.ring.chain import Descriptor

CAPACITY = 1 << 20  # sectors
LIMITS = vb.Limits(
    capacity_sectors=CAPACITY,
    discard=True,
    max_discard_sectors=1000,
    max_discard_seg=4,
    write_zeroes=True,
    max_write_zeroes_sectors=2000,
    max_write_zeroes_seg=2,
)

R, W = False, True
HDR, DATA, STATUS = 0x1000, 0x10000, 0x90000


def hdr(kind: int, sector: int = 0) -> vb.RequestHeader:
    return vb.RequestHeader(kind, 0, sector)


def canonical(data_len: int, *, writable_data: bool) -> list[Descriptor]:
    descs = [Descriptor(HDR, 16, R)]
    if data_len:
        descs.append(Descriptor(DATA, data_len, writable_data))
    descs.append(Descriptor(STATUS, 1, W))
    return descs


def plan(
    kind: int, descs: list[Descriptor], sector: int = 0, limits: vb.Limits = LIMITS
) -> vb.Plan:
    return vb.plan_request(hdr(kind, sector), vb.split_chain(descs), limits)


# -- layouts --------------------------------------------------------------------------------


def test_struct_sizes() -> None:
    assert vb.REQUEST_HEADER.size == 16
    assert vb.DWZ_SEGMENT.size == 16
    assert vb.CONFIG.size == 72


def test_config_field_offsets_match_the_spec() -> None:
    cfg = vb.BlkConfig(
        capacity=0x0102030405060708,
        size_max=0x11,
        seg_max=0x22,
        blk_size=0x33,
        writeback=1,
        num_queues=0x4455,
        max_discard_sectors=0x66,
        max_write_zeroes_seg=0x77,
        write_zeroes_may_unmap=1,
        secure_erase_sector_alignment=0x88,
    )
    raw = cfg.pack()
    assert struct.unpack_from("<Q", raw, 0)[0] == 0x0102030405060708
    assert struct.unpack_from("<I", raw, 8)[0] == 0x11
    assert struct.unpack_from("<I", raw, 12)[0] == 0x22
    assert struct.unpack_from("<I", raw, 20)[0] == 0x33
    assert raw[vb.CONFIG_WRITEBACK_OFFSET] == 1 == raw[32]
    assert struct.unpack_from("<H", raw, 34)[0] == 0x4455
    assert struct.unpack_from("<I", raw, 36)[0] == 0x66
    assert struct.unpack_from("<I", raw, 52)[0] == 0x77
    assert raw[56] == 1
    assert struct.unpack_from("<I", raw, 68)[0] == 0x88


@given(st.lists(st.integers(0, 255), min_size=72, max_size=72).map(bytes))
def test_config_round_trip(raw: bytes) -> None:
    # Padding bytes (unused0, unused1) are not kept: compare through one more round trip.
    cfg = vb.BlkConfig.unpack(raw)
    assert vb.BlkConfig.unpack(cfg.pack()) == cfg


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1))
def test_header_round_trip(kind: int, reserved: int, sector: int) -> None:
    h = vb.RequestHeader(kind, reserved, sector)
    assert vb.decode_header(h.pack()) == h
    assert h.pack() == struct.pack("<IIQ", kind, reserved, sector)


def test_segment_round_trip() -> None:
    s = vb.DwzSegment(5, 7, 1)
    assert vb.DWZ_SEGMENT.unpack(s.pack()) == (5, 7, 1)


def test_decode_header_rejects_wrong_length() -> None:
    with pytest.raises(ValueError):
        vb.decode_header(b"\0" * 15)


def test_id_bytes() -> None:
    assert vb.id_bytes("abc") == b"abc" + b"\0" * 17
    assert vb.id_bytes("x" * 25) == b"x" * 20
    assert len(vb.id_bytes("")) == 20


# -- exact layouts --------------------------------------------------------------------------


def test_read_canonical() -> None:
    assert plan(vb.VIRTIO_BLK_T_IN, canonical(4096, writable_data=True), sector=8) == vb.Read(
        4096, 4096, ((DATA, 4096),)
    )


def test_write_canonical() -> None:
    assert plan(vb.VIRTIO_BLK_T_OUT, canonical(1024, writable_data=False), 2) == vb.Write(
        1024, 1024, ((DATA, 1024),)
    )


def test_header_straddles_descriptors() -> None:
    descs = [Descriptor(HDR, 10, R), Descriptor(0x5000, 6 + 512, R), Descriptor(STATUS, 1, W)]
    layout = vb.split_chain(descs)
    assert layout.header == ((HDR, 10), (0x5000, 6))
    assert layout.readable == ((0x5006, 512),)
    assert layout.status == STATUS


def test_data_shares_descriptor_with_status() -> None:
    descs = [Descriptor(HDR, 16, R), Descriptor(DATA, 513, W)]
    assert plan(vb.VIRTIO_BLK_T_IN, descs) == vb.Read(0, 512, ((DATA, 512),))
    assert vb.split_chain(descs).status == DATA + 512


def test_one_readable_descriptor_with_header_and_data() -> None:
    descs = [Descriptor(HDR, 16 + 512, R), Descriptor(STATUS, 1, W)]
    assert plan(vb.VIRTIO_BLK_T_OUT, descs) == vb.Write(0, 512, ((HDR + 16, 512),))


def test_adjacent_descriptors_merge() -> None:
    descs = [
        Descriptor(HDR, 16, R),
        Descriptor(DATA, 512, W),
        Descriptor(DATA + 512, 512, W),
        Descriptor(STATUS, 1, W),
    ]
    assert plan(vb.VIRTIO_BLK_T_IN, descs) == vb.Read(0, 1024, ((DATA, 1024),))


def test_zero_length_descriptors_are_ignored() -> None:
    descs = [Descriptor(HDR, 16, R), Descriptor(0, 0, R), Descriptor(STATUS, 1, W)]
    assert plan(vb.VIRTIO_BLK_T_FLUSH, descs) == vb.Flush()
    descs = [*descs, Descriptor(0x7000, 0, W)]
    assert vb.split_chain(descs).status == STATUS


def test_no_status_when_last_descriptor_is_readable() -> None:
    layout = vb.split_chain([Descriptor(HDR, 16, R), Descriptor(DATA, 512, R)])
    assert layout.status is None
    assert vb.plan_request(hdr(vb.VIRTIO_BLK_T_OUT), layout, LIMITS) == vb.Fail(
        vb.VIRTIO_BLK_S_IOERR
    )
    assert vb.split_chain([]).status is None


def test_readable_after_writable_fails() -> None:
    descs = [Descriptor(HDR, 16, R), Descriptor(DATA, 512, W), Descriptor(0x5000, 512, R)]
    descs.append(Descriptor(STATUS, 1, W))
    layout = vb.split_chain(descs)
    assert layout.misordered
    assert plan(vb.VIRTIO_BLK_T_IN, descs) == vb.Fail(vb.VIRTIO_BLK_S_IOERR)


def test_short_header_fails() -> None:
    descs = [Descriptor(HDR, 15, R), Descriptor(STATUS, 1, W)]
    assert vb.split_chain(descs).header_length == 15
    assert plan(vb.VIRTIO_BLK_T_FLUSH, descs) == vb.Fail(vb.VIRTIO_BLK_S_IOERR)


@pytest.mark.parametrize("kind", [vb.VIRTIO_BLK_T_IN, vb.VIRTIO_BLK_T_OUT])
def test_length_must_be_whole_sectors(kind: int) -> None:
    descs = canonical(513, writable_data=kind == vb.VIRTIO_BLK_T_IN)
    assert plan(kind, descs) == vb.Fail(vb.VIRTIO_BLK_S_IOERR)


@pytest.mark.parametrize("kind", [vb.VIRTIO_BLK_T_IN, vb.VIRTIO_BLK_T_OUT])
@pytest.mark.parametrize(
    ("sector", "ok"),
    [
        (CAPACITY - 1, True),
        (CAPACITY, False),
        (2**64 // 512 - 1, False),
        (2**64 // 512, False),
        (2**64 - 1, False),
    ],
)
def test_bounds(kind: int, sector: int, ok: bool) -> None:
    result = plan(kind, canonical(512, writable_data=kind == vb.VIRTIO_BLK_T_IN), sector)
    assert (not isinstance(result, vb.Fail)) == ok


def test_empty_read_at_capacity_is_fine() -> None:
    assert plan(vb.VIRTIO_BLK_T_IN, canonical(0, writable_data=True), CAPACITY) == vb.Read(
        CAPACITY * 512, 0, ()
    )


def test_read_only_refuses_writes() -> None:
    ro = vb.Limits(capacity_sectors=CAPACITY, read_only=True)
    assert plan(vb.VIRTIO_BLK_T_OUT, canonical(512, writable_data=False), limits=ro) == vb.Fail(
        vb.VIRTIO_BLK_S_IOERR
    )
    for kind in (vb.VIRTIO_BLK_T_DISCARD, vb.VIRTIO_BLK_T_WRITE_ZEROES):
        assert plan(kind, canonical(16, writable_data=False), limits=ro) == vb.Fail(
            vb.VIRTIO_BLK_S_IOERR
        )
    assert isinstance(
        plan(vb.VIRTIO_BLK_T_IN, canonical(512, writable_data=True), limits=ro), vb.Read
    )


@pytest.mark.parametrize(("writable", "expected"), [(1, 0), (9, 8), (21, 20), (100, 20)])
def test_get_id_writes_at_most_20_bytes(writable: int, expected: int) -> None:
    descs = [Descriptor(HDR, 16, R), Descriptor(DATA, writable, W)]
    result = plan(vb.VIRTIO_BLK_T_GET_ID, descs)
    assert result == vb.GetId(expected, ((DATA, expected),) if expected else ())


@pytest.mark.parametrize(
    "kind",
    [vb.VIRTIO_BLK_T_GET_LIFETIME, vb.VIRTIO_BLK_T_SECURE_ERASE, 2, 3, 99, 2**32 - 1],
)
def test_unknown_types_are_unsupported(kind: int) -> None:
    assert plan(kind, canonical(16, writable_data=False)) == vb.Fail(vb.VIRTIO_BLK_S_UNSUPP)


def test_discard_unsupported_without_feature() -> None:
    limits = vb.Limits(capacity_sectors=CAPACITY)
    for kind in (vb.VIRTIO_BLK_T_DISCARD, vb.VIRTIO_BLK_T_WRITE_ZEROES):
        assert plan(kind, canonical(16, writable_data=False), limits=limits) == vb.Fail(
            vb.VIRTIO_BLK_S_UNSUPP
        )


@pytest.mark.parametrize(
    ("kind", "length", "ok"),
    [
        (vb.VIRTIO_BLK_T_DISCARD, 0, False),
        (vb.VIRTIO_BLK_T_DISCARD, 17, False),
        (vb.VIRTIO_BLK_T_DISCARD, 64, True),
        (vb.VIRTIO_BLK_T_DISCARD, 80, False),
        (vb.VIRTIO_BLK_T_WRITE_ZEROES, 32, True),
        (vb.VIRTIO_BLK_T_WRITE_ZEROES, 48, False),
    ],
)
def test_segment_count(kind: int, length: int, ok: bool) -> None:
    result = plan(kind, canonical(length, writable_data=False))
    if ok:
        assert result == vb.ReadSegments(kind, length, ((DATA, length),))
    else:
        assert result == vb.Fail(vb.VIRTIO_BLK_S_UNSUPP)


def seg(sector: int, n: int, flags: int = 0) -> bytes:
    return vb.DwzSegment(sector, n, flags).pack()


def test_decode_segments() -> None:
    d, wz = vb.VIRTIO_BLK_T_DISCARD, vb.VIRTIO_BLK_T_WRITE_ZEROES
    assert vb.decode_segments(d, seg(1, 2) + seg(10, 0), LIMITS) == (vb.Range(512, 1024, False),)
    assert vb.decode_segments(wz, seg(1, 2, 1), LIMITS) == (vb.Range(512, 1024, True),)
    unsupp, ioerr = vb.Fail(vb.VIRTIO_BLK_S_UNSUPP), vb.Fail(vb.VIRTIO_BLK_S_IOERR)
    assert vb.decode_segments(d, seg(1, 2, 1), LIMITS) == unsupp  # UNMAP on DISCARD
    assert vb.decode_segments(wz, seg(1, 2, 2), LIMITS) == unsupp
    assert vb.decode_segments(d, seg(1, 2, 1 << 31), LIMITS) == unsupp
    assert vb.decode_segments(d, seg(0, 1001), LIMITS) == ioerr
    assert vb.decode_segments(wz, seg(0, 2000), LIMITS) == (vb.Range(0, 2000 * 512, False),)
    assert vb.decode_segments(wz, seg(CAPACITY - 1, 2), LIMITS) == ioerr
    assert vb.decode_segments(wz, seg(2**64 - 1, 1), LIMITS) == ioerr
    # The sector limit is for the whole request: overlapping segments cannot multiply it.
    assert vb.decode_segments(d, seg(0, 600) + seg(0, 400), LIMITS) == (
        vb.Range(0, 600 * 512, False),
        vb.Range(0, 400 * 512, False),
    )
    assert vb.decode_segments(d, seg(0, 600) + seg(0, 401), LIMITS) == ioerr
    assert vb.decode_segments(wz, seg(5, 1000) * 2 + seg(5, 1), LIMITS) == ioerr
    with pytest.raises(ValueError):
        vb.decode_segments(vb.VIRTIO_BLK_T_IN, seg(0, 1), LIMITS)


# -- properties -----------------------------------------------------------------------------


@st.composite
def cuts(draw: st.DrawFn, base: int, length: int, writable: bool) -> list[Descriptor]:
    """Split [base, base+length) into contiguous descriptors, maybe with empty ones."""
    points = sorted(draw(st.sets(st.integers(1, max(1, length - 1)), max_size=6)))
    points = [p for p in points if 0 < p < length]
    bounds = [0, *points, length]
    out: list[Descriptor] = []
    for a, b in itertools.pairwise(bounds):
        if draw(st.booleans()) and draw(st.booleans()):
            out.append(Descriptor(base + a, 0, writable))
        out.append(Descriptor(base + a, b - a, writable))
    return out


@settings(max_examples=300)
@given(
    st.integers(16, 16 + 4096),
    st.integers(1, 4097),
    st.data(),
)
def test_any_contiguous_layout_parses_like_the_canonical_one(
    readable: int, writable: int, data: st.DataObject
) -> None:
    canon = [Descriptor(HDR, 16, R)]
    if readable > 16:
        canon.append(Descriptor(HDR + 16, readable - 16, R))
    if writable > 1:
        canon.append(Descriptor(DATA, writable - 1, W))
    canon.append(Descriptor(DATA + writable - 1, 1, W))
    split = data.draw(cuts(HDR, readable, R)) + data.draw(cuts(DATA, writable, W))
    expected = vb.split_chain(canon)
    assert vb.split_chain(split) == expected
    for kind in (vb.VIRTIO_BLK_T_IN, vb.VIRTIO_BLK_T_OUT, vb.VIRTIO_BLK_T_DISCARD):
        h = hdr(kind, 3)
        assert vb.plan_request(h, vb.split_chain(split), LIMITS) == vb.plan_request(
            h, expected, LIMITS
        )


@st.composite
def scattered(draw: st.DrawFn, length: int, writable: bool, start: int) -> list[Descriptor]:
    sizes: list[int] = []
    left = length
    while left:
        n = draw(st.integers(1, left))
        sizes.append(n)
        left -= n
    out, gpa = [], start
    for n in sizes:
        out.append(Descriptor(gpa, n, writable))
        gpa += n + draw(st.integers(1, 64))  # never adjacent
    return out


def logical(segments: tuple[vb.Segment, ...], pieces: list[Descriptor]) -> list[int]:
    """Map segments back to positions in the logical byte stream the pieces carry."""
    out: list[int] = []
    for gpa, n in segments:
        pos = 0
        for p in pieces:
            if p.gpa <= gpa and gpa + n <= p.gpa + p.length:
                out.extend(range(pos + gpa - p.gpa, pos + gpa - p.gpa + n))
                break
            pos += p.length
        else:
            raise AssertionError(f"segment {gpa:#x}+{n} is in no descriptor")
    return out


@settings(max_examples=200)
@given(st.integers(0, 600), st.integers(1, 600), st.data())
def test_any_scattered_layout_maps_the_logical_stream(
    readable: int, writable: int, data: st.DataObject
) -> None:
    rd = data.draw(scattered(readable, R, 0x1000))
    wr = data.draw(scattered(writable, W, 0x100000))
    layout = vb.split_chain(rd + wr)
    head = min(16, readable)
    assert layout.header_length == head
    assert logical(layout.header, rd) == list(range(head))
    assert layout.readable_length == readable - head
    assert logical(layout.readable, rd) == list(range(head, readable))
    assert layout.writable_length == writable - 1
    assert logical(layout.writable, wr) == list(range(writable - 1))
    assert layout.status is not None
    assert logical(((layout.status, 1),), wr) == [writable - 1]
    assert not layout.misordered


descriptor = st.builds(
    Descriptor,
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**32 - 1),
    st.booleans(),
)


@settings(max_examples=500)
@given(
    st.lists(descriptor, max_size=8),
    st.binary(min_size=16, max_size=16),
    st.binary(max_size=80).map(lambda b: b[: len(b) // 16 * 16]),
    st.booleans(),
)
def test_garbage_gives_a_plan_never_an_exception(
    descs: list[Descriptor], header: bytes, segs: bytes, read_only: bool
) -> None:
    limits = vb.Limits(
        capacity_sectors=CAPACITY,
        read_only=read_only,
        discard=True,
        max_discard_sectors=1000,
        max_discard_seg=4,
        write_zeroes=True,
        max_write_zeroes_sectors=1000,
        max_write_zeroes_seg=4,
    )
    layout = vb.split_chain(descs)
    result = vb.plan_request(vb.decode_header(header), layout, limits)
    assert isinstance(result, vb.Read | vb.Write | vb.Flush | vb.GetId | vb.ReadSegments | vb.Fail)
    if isinstance(result, vb.Read | vb.Write):
        assert result.offset + result.length <= CAPACITY * 512
        assert result.length % 512 == 0
        assert sum(n for _, n in result.segments) == result.length
    if isinstance(result, vb.Write | vb.ReadSegments):
        assert not read_only
    for kind in (vb.VIRTIO_BLK_T_DISCARD, vb.VIRTIO_BLK_T_WRITE_ZEROES):
        ranges = vb.decode_segments(kind, segs, limits)
        if not isinstance(ranges, vb.Fail):
            for r in ranges:
                assert 0 < r.length and r.offset + r.length <= CAPACITY * 512
            assert sum(r.length for r in ranges) <= 1000 * 512
